"""The one plain-torch model of FactorKV: a batched, KV-cached Llama/GPT-2 forward.

Everything outside vLLM that computes attention uses it: the engine's parity tests (ground
truth for the vLLM models), calibration (teacher and student), evaluation (perplexity,
passkey, chat) and the eviction benchmark. It reads the checkpoint directories the engine
serves (docs/checkpoint-format.md) and ordinary Hugging Face checkpoints alike:

    n = norm(x)
    q = W_q n (+b) [T, H, r]     k = W_k n (+b) [T, H_kv, r]     v = W_v n (+b) [T, H_kv, D]
    q, k = keys.rotate(q, k)                 (the layer's key parametrisation, e.g. RoPE;
                                              latent keys reconstruct k first)
    o = softmax(scale · q kᵀ + mask) v       (query head h reads KV head h // (H / H_kv))
    x = x + W_o o;   x = x + MLP(norm(x))

The key parametrisation of each layer is a small object: :class:`RotaryKeys` covers full keys
(r = D, the source's RoPE table) and thin keys (r < D, their own per-KV-head table); merged
KV heads are only a smaller H_kv; :class:`LatentKeys` reconstructs D-dim keys from a pre-RoPE
latent (k_up_proj) and rotates them with the full-width table. A parametrisation implements
``dims`` and ``rotate`` (the queries and keys that meet in the scores; those keys are what
this model caches).

The mask is causal over the cache; an optional per-layer keep mask ``keep[l]`` (bool
[B, H_kv, S], True = visible) hides evicted tokens from query rows >= ``keep_from``
(L2-norm eviction, engine/eviction/policy.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers.activations import ACT2FN

from engine.checkpoint import BLOCK, FactoredKeysConfig, model_dims
from engine.rotary import ThinRotaryEmbedding, source_inv_freq
from engine.weights import gpt2_state, is_gpt2, load_checkpoint


@dataclass
class RotaryKeys:
    """Keys of rank r per KV head, cached after RoPE (or without it: GPT-2).

    rank = head_dim with the source's table is the original model; rank < head_dim with a
    per-KV-head table is thin keys (engine.rotary.ThinRotaryEmbedding)."""

    rank: int
    rope: ThinRotaryEmbedding | None

    @property
    def dims(self) -> int:
        """Dims per head of the queries and keys that meet in the scores."""
        return self.rank

    def rotate(self, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, H*r], k [B, T, H_kv*r] at positions pos [T] or [B, T] -> rotated q, k."""
        if self.rope is None:
            return q, k
        b, t = q.shape[:2]
        flat = pos.reshape(-1) if pos.dim() == 2 else pos.repeat(b)
        q, k = self.rope(flat, q.reshape(b * t, -1), k.reshape(b * t, -1))
        return q.view(b, t, -1), k.view(b, t, -1)

    def to(self, device) -> "RotaryKeys":
        if self.rope is not None:
            self.rope.to(device)
        return self


@dataclass
class LatentKeys:
    """RoPE-exact latent keys: k_proj gives a pre-RoPE latent c (r dims per KV head, H_kv·r in
    all, split into ``groups`` groups of consecutive KV heads); KV head h's key is
    k_h = up[h·D:(h+1)·D] · c_{h // (H_kv/groups)}, rotated with the full-width table like the
    original model's keys. Queries are full width (D). The serving cache holds c; this model
    caches the rotated keys it reconstructs, which is the same function of each token."""

    rank: int
    head_dim: int
    num_kv_heads: int
    groups: int
    rope: ThinRotaryEmbedding | None

    @property
    def dims(self) -> int:
        return self.head_dim

    def reconstruct(self, c: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Latent c [..., H_kv*r] -> pre-RoPE keys [..., H_kv*D] (up: [H_kv*D, r_g])."""
        g, m, d = self.groups, self.num_kv_heads // self.groups, self.head_dim
        c = c.unflatten(-1, (g, m * self.rank))                                # [..., G, r_g]
        k = torch.einsum("...gr,gmdr->...gmd", c, up.view(g, m, d, m * self.rank))
        return k.flatten(-3)

    def rotate(self, pos: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               up: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q [B, T, H*D], latent k [B, T, H_kv*r] -> rotated q, rotated keys [B, T, H_kv*D]."""
        return RotaryKeys(self.head_dim, self.rope).rotate(pos, q, self.reconstruct(k, up))

    def to(self, device) -> "LatentKeys":
        if self.rope is not None:
            self.rope.to(device)
        return self


def key_parametrisation(cfg: dict) -> tuple[list[RotaryKeys | LatentKeys], float]:
    """Per-layer keys of a checkpoint and its softmax scale: its factored-keys block, or the
    original's full keys (scale D**-0.5)."""
    n_layers, h, h_kv, d, _ = model_dims(cfg)
    if BLOCK in cfg:
        fk = FactoredKeysConfig.from_hf_config(cfg)
        ropes = [None] * n_layers if fk.inv_freq is None else [
            ThinRotaryEmbedding(f, h, fk.rotary_attention_scaling) for f in fk.inv_freq]
        if fk.latent:
            return [LatentKeys(r, d, h_kv, fk.latent_groups, rope)
                    for r, rope in zip(fk.ranks, ropes)], fk.softmax_scale
        return [RotaryKeys(r, rope) for r, rope in zip(fk.ranks, ropes)], fk.softmax_scale
    if is_gpt2(cfg):
        return [RotaryKeys(d, None) for _ in range(n_layers)], d ** -0.5
    inv, scaling = source_inv_freq(cfg)
    table = inv[None].expand(h_kv, -1).double()
    return [RotaryKeys(d, ThinRotaryEmbedding(table, h, scaling)) for _ in range(n_layers)], \
        d ** -0.5


class TorchCausalLM(torch.nn.Module):
    """Llama-family or GPT-2-family causal LM, original or factored, batched, KV-cached.

    ``TorchCausalLM(cfg, state)``: cfg is config.json, state the tensors (shared, not copied).
    ``make_trainable(names)`` turns checkpoint tensors into parameters (calibration)."""

    def __init__(self, cfg: dict, state: dict[str, torch.Tensor]):
        super().__init__()
        self.cfg = cfg
        self.gpt2 = is_gpt2(cfg)
        self.n_layers, self.h, self.h_kv, self.d, self.hidden = model_dims(cfg)
        self.w = gpt2_state(cfg, state) if self.gpt2 else dict(state)
        self.keys, self.scale = key_parametrisation(cfg)
        if self.gpt2:
            self.eps = cfg.get("layer_norm_epsilon", 1e-5)
            self.act = ACT2FN[cfg.get("activation_function", "gelu_new")]
        else:
            self.eps = cfg.get("rms_norm_eps", 1e-6)
            self.act = ACT2FN[cfg.get("hidden_act", "silu")]
        self.trained = torch.nn.ParameterList()
        self._trained_names: list[str] = []

    @classmethod
    def from_dir(cls, path: str | Path) -> "TorchCausalLM":
        return cls(*load_checkpoint(path))

    # -------------------------------------------------------------- parameters and devices
    def make_trainable(self, names: list[str]) -> list[torch.nn.Parameter]:
        """Replace the named tensors by float32 parameters (returned, in order); the tensors
        the model was built from are copied, never trained in place."""
        params = []
        for name in names:
            p = torch.nn.Parameter(self.w[name].detach().float().clone())
            self.w[name] = p
            self.trained.append(p)
            self._trained_names.append(name)
            params.append(p)
        return params

    def trained_state(self, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The trainable tensors (or those of ``names``), detached, on the CPU, under their
        checkpoint names."""
        return {n: self.w[n].detach().cpu().clone()
                for n in (self._trained_names if names is None else names)}

    def to_device(self, device: torch.device | str) -> "TorchCausalLM":
        """Move every tensor (weights, rotary tables, parameters) to device."""
        self.trained.to(device)
        self.w = {k: (v if isinstance(v, torch.nn.Parameter) else v.to(device))
                  for k, v in self.w.items()}
        self.w.update({n: p for n, p in zip(self._trained_names, self.trained)})
        for keys in self.keys:
            keys.to(device)
        return self

    # -------------------------------------------------------------- blocks
    def prefix(self, i: int) -> str:
        """Name prefix of layer i's attention projections."""
        return f"transformer.h.{i}.attn" if self.gpt2 else f"model.layers.{i}.self_attn"

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def _conv1d(self, x: torch.Tensor, name: str) -> torch.Tensor:   # HF Conv1D: x @ W + b
        return x @ self.w[f"{name}.weight"] + self.w[f"{name}.bias"]

    def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        if self.gpt2:
            return F.layer_norm(x, (x.shape[-1],), self.w[f"{name}.weight"],
                                self.w[f"{name}.bias"], self.eps)
        return self.w[f"{name}.weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)
                                                           + self.eps))

    def attn_norm(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return self._norm(x, f"transformer.h.{i}.ln_1" if self.gpt2
                          else f"model.layers.{i}.input_layernorm")

    def embed(self, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        if self.gpt2:
            return self.w["transformer.wte.weight"][ids] + self.w["transformer.wpe.weight"][pos]
        return self.w["model.embed_tokens.weight"][ids]

    def attention(self, i: int, n: torch.Tensor, pos: torch.Tensor, cache: list | None = None,
                  evict=None) -> torch.Tensor:
        """Layer i's attention on normed input n [B, T, hidden] at positions pos [T] (or per
        row, [B, T]) -> the block's output [B, T, hidden] (after W_o). ``cache``: list of
        per-layer (k, v) ([B, H_kv, S, r] as cached, [B, H_kv, S, D]), extended in place.
        ``evict=(policy, L)``: query rows at cache index >= L see only the prompt keys
        (index < L) that ``policy.keep_mask`` keeps, per KV head (latent keys: per layer),
        plus every key >= L."""
        b, t, _ = n.shape
        p, keys = self.prefix(i), self.keys[i]
        q, k = self._rotated_qk(i, n, pos)
        v = self._values(i, n)
        if cache is not None:
            if len(cache) > i:
                k, v = torch.cat((cache[i][0], k), 2), torch.cat((cache[i][1], v), 2)
                cache[i] = (k, v)
            else:
                cache.append((k, v))
        keep = keep_from = None
        if evict is not None:
            policy, keep_from = evict
            per_layer = isinstance(keys, LatentKeys)     # rotated keys: per-head norms kept
            keep = torch.stack([policy.keep_mask(kb.transpose(0, 1), keep_from, per_layer=per_layer)
                                for kb in k])
        mask = self._mask(t, k.shape[2], n.device, keep, keep_from)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           is_causal=mask is None and t > 1, scale=self.scale,
                                           enable_gqa=self.h != self.h_kv)
        o = o.transpose(1, 2).reshape(b, t, self.h * self.d)
        if self.gpt2:
            return self._conv1d(o, f"{p}.c_proj")
        return self._lin(o, f"{p}.o_proj")

    def attention_last_rows(self, i: int, n: torch.Tensor, pos: torch.Tensor,
                            rows: int) -> torch.Tensor:
        """attention(i, n, pos)[:, -rows:] at rows / T of its attention work: the last ``rows``
        query rows of n [B, T, hidden] (positions pos [T] or [B, T]) over the keys and values of
        all T rows (a long-context loss on a few rows, gradients through every key)."""
        t = n.shape[1] - rows
        _, k = self._rotated_qk(i, n[:, :t], pos[..., :t])
        cache = [None] * i + [(k, self._values(i, n[:, :t]))]       # layer i: the first t rows
        return self.attention(i, n[:, t:], pos[..., t:], cache)

    def _values(self, i: int, n: torch.Tensor) -> torch.Tensor:
        """Layer i's values [B, H_kv, T, D] of normed n [B, T, hidden]."""
        b, t, _ = n.shape
        v = self._lin(n, f"{self.prefix(i)}.v_proj")
        return v.view(b, t, self.h_kv, self.d).transpose(1, 2)

    def _rotated_qk(self, i: int, n: torch.Tensor, pos: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's rotated queries [B, H, T, D'] and keys [B, H_kv, T, D'] of normed n."""
        b, t, _ = n.shape
        p, keys = self.prefix(i), self.keys[i]
        q, k = keys.rotate(pos, self._lin(n, f"{p}.q_proj"), self._lin(n, f"{p}.k_proj"),
                           self.w.get(f"{p}.k_up_proj.weight"))
        return (q.view(b, t, self.h, keys.dims).transpose(1, 2),
                k.view(b, t, self.h_kv, keys.dims).transpose(1, 2))

    def pre_rope_keys(self, i: int, n: torch.Tensor) -> torch.Tensor:
        """Layer i's keys before rotation [B, T, H_kv·D'] of normed n: W_k n (+b), for latent
        keys reconstructed, B (A n)."""
        p, keys = self.prefix(i), self.keys[i]
        k = self._lin(n, f"{p}.k_proj")
        up = self.w.get(f"{p}.k_up_proj.weight")
        return k if up is None else keys.reconstruct(k, up)

    def attention_probs(self, i: int, n: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Layer i's causal attention probabilities [B, H, T, T] on normed input n [B, T,
        hidden] at positions pos (no cache): softmax(scale · q_h · k_g(h)) over keys 0..t."""
        q, k = self._rotated_qk(i, n, pos)
        k = k.repeat_interleave(self.h // self.h_kv, dim=1)
        t = q.shape[2]
        causal = torch.ones(t, t, dtype=torch.bool, device=n.device).tril()
        return ((q @ k.transpose(-1, -2)) * self.scale).masked_fill(~causal, float("-inf")
                                                                    ).softmax(-1)

    def _mask(self, t: int, total: int, device, keep: torch.Tensor | None,
              keep_from: int | None) -> torch.Tensor | None:
        """None (plain causal, or a single query row) or bool [.., T, S+T]: query row j
        (position s + j) sees keys 0..s + j, and with ``keep`` only kept keys from keep_from on."""
        s = total - t
        if keep is None:
            if not s or t == 1:
                return None
            return torch.ones(t, total, dtype=torch.bool, device=device).tril(s)
        causal = torch.ones(t, total, dtype=torch.bool, device=device).tril(s)
        rows = (torch.arange(s, total, device=device) >= keep_from)[:, None]         # [T, 1]
        g = self.h // self.h_kv
        kept = keep.repeat_interleave(g, dim=1)[:, :, None, :] | ~rows                 # [B, H, T, S+T]
        return causal & kept

    def mlp_block(self, i: int, x: torch.Tensor) -> torch.Tensor:
        """x + MLP(norm(x)) of layer i."""
        if self.gpt2:
            p = f"transformer.h.{i}"
            h = self._conv1d(self._norm(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")
            return x + self._conv1d(self.act(h), f"{p}.mlp.c_proj")
        p = f"model.layers.{i}"
        n = self._norm(x, f"{p}.post_attention_layernorm")
        m = self.act(self._lin(n, f"{p}.mlp.gate_proj")) * self._lin(n, f"{p}.mlp.up_proj")
        return x + self._lin(m, f"{p}.mlp.down_proj")

    def layer(self, i: int, x: torch.Tensor, pos: torch.Tensor, cache: list | None = None,
              evict=None) -> torch.Tensor:
        x = x + self.attention(i, self.attn_norm(i, x), pos, cache, evict)
        return self.mlp_block(i, x)

    # -------------------------------------------------------------- whole model
    def hidden_states(self, ids: torch.Tensor, cache: list | None = None,
                      pos0: int | None = None, evict=None,
                      positions: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> final normed hidden states [B, T, hidden]. ``cache``: a list of
        per-layer (k, v) (see :meth:`attention`; S may differ per layer), read and extended in
        place. ``pos0``: position of ids[:, 0] (default: layer 0's S; larger after a
        compacting eviction); ``positions`` ([T] or per row [B, T]) replaces pos0.. pos0+T-1.
        ``evict=(policy, L)``: see :meth:`attention`."""
        if (pos := positions) is None:
            pos0 = (cache[0][0].shape[2] if cache else 0) if pos0 is None else pos0
            pos = torch.arange(pos0, pos0 + ids.shape[1], device=ids.device)
        x = self.embed(ids, pos)
        for i in range(self.n_layers):
            x = self.layer(i, x, pos, cache, evict)
        return self._norm(x, "transformer.ln_f" if self.gpt2 else "model.norm")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.w.get("lm_head.weight")
        if head is None:
            head = self.w["transformer.wte.weight" if self.gpt2 else "model.embed_tokens.weight"]
        return hidden @ head.T

    def forward(self, ids: torch.Tensor, cache: list | None = None, evict=None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
        """ids [B, T] -> logits [B, T, vocab]; ids [T] -> logits [T, vocab] (float32).
        ``positions``: see :meth:`hidden_states`."""
        if ids.dim() == 1:
            return self.forward(ids[None], cache, evict, positions)[0]
        return self.logits(self.hidden_states(ids, cache, None, evict, positions)).float()


def crop_cache(cache: list, length: int) -> list:
    """A view of the first ``length`` positions of a KV cache (the original is untouched)."""
    return [(k[:, :, :length], v[:, :, :length]) for k, v in cache]


@torch.no_grad()
def greedy_with_eviction(model: TorchCausalLM, prompt_ids, policy, n_new: int
                         ) -> tuple[list[int], list[float]]:
    """Greedy continuation of prompt_ids (length L) with the prompt's KV evicted by ``policy``
    after prefill: token t_j = argmax logits_{L-1+j} of model(prompt + t_<j, evict=(policy, L)).
    Returns (n_new token ids, log p of each chosen token). The full sequence is re-run per
    token (tiny test models only)."""
    ids = [int(t) for t in prompt_ids]
    n_prompt, out, lps = len(ids), [], []
    for _ in range(n_new):
        logits = model(torch.tensor(ids + out), evict=(policy, n_prompt))[-1]
        lp = torch.log_softmax(logits.double(), dim=-1)
        nxt = int(logits.argmax())
        out.append(nxt)
        lps.append(lp[nxt].item())
    return out, lps
