"""Plain-torch reference of factored-key models (no vLLM), read top to bottom.

Used by the tests as ground truth for the vLLM models and by the converter's
calibration and evaluation. It reads the same checkpoint directory the engine
serves (docs/checkpoint-format.md) and computes full-sequence logits:

    q = W_q x (+b)  [T, H, r]      k = W_k x (+b)  [T, H_kv, r]      v = W_v x  [T, H_kv, D]
    q, k = thin RoPE(q, k)          (Llama family only)
    o = softmax(scale * q kᵀ + causal mask) v          (query head h reads KV head h // (H/H_kv))

With ``evict=(policy, L)`` (L2-norm eviction, engine/eviction/policy.py): per layer and KV
head, keep = policy.select(‖k_j‖₂ for j < L) (k as cached, after RoPE); query rows i >= L see
only the kept prompt keys plus keys L..i; rows < L (the prompt) are unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers.activations import ACT2FN

from engine.checkpoint import GPT2_ARCH, FactoredKeysConfig, model_dims
from engine.rotary import ThinRotaryEmbedding


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def thin_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   keep: torch.Tensor | None = None, keep_from: int = 0) -> torch.Tensor:
    """Causal GQA attention. q [T, H, r], k [T, H_kv, r], v [T, H_kv, D] -> [T, H*D].

    `keep` (optional, bool [H_kv, T]) drops keys per KV head (for eviction references), for
    query rows >= `keep_from` only (earlier rows attend causally to every key).
    """
    t, h, _ = q.shape
    h_kv = k.shape[1]
    g = h // h_kv
    qh = q.permute(1, 0, 2)                                 # [H, T, r]
    kh = k.permute(1, 0, 2).repeat_interleave(g, dim=0)     # [H, T, r]
    vh = v.permute(1, 0, 2).repeat_interleave(g, dim=0)     # [H, T, D]
    scores = (qh @ kh.transpose(1, 2)).float() * scale      # [H, T, T]
    mask = torch.ones(t, t, dtype=torch.bool).tril()
    if keep is not None:
        rows = torch.arange(t)[:, None] >= keep_from                      # [T, 1]
        kept = keep.repeat_interleave(g, dim=0)[:, None, :] | ~rows[None]  # [H, T, T]
        mask = mask[None] & kept
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1).to(vh.dtype) @ vh   # [H, T, D]
    return out.permute(1, 0, 2).reshape(t, -1)


def evict_mask(policy, k: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Keys [T, H_kv, r] (as cached) -> bool [H_kv, T]: True at policy.select(‖k_j‖₂, j < L)
    and at every j >= L (tokens after the prompt are never evicted)."""
    t, h_kv, _ = k.shape
    norms = k[:prompt_len].float().norm(dim=-1).T                  # [H_kv, L]
    keep = torch.zeros(h_kv, t, dtype=torch.bool)
    keep[:, prompt_len:] = True
    keep.scatter_(1, policy.select(norms), True)
    return keep


class FactoredReference(torch.nn.Module):
    """Factored Llama-family or GPT-2-family model from a checkpoint directory."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = json.loads((Path(path) / "config.json").read_text())
        self.fk = FactoredKeysConfig.from_hf_config(self.cfg)
        self.gpt2 = (self.cfg.get("architectures") or [""])[0] == GPT2_ARCH
        self.n_layers, self.n_heads, self.n_kv, self.head_dim, self.hidden = model_dims(self.cfg)
        self.w = {k: v.to(dtype) for k, v in load_state_dict(path).items()}
        self.rope = None
        if self.fk.has_rope:
            self.rope = [ThinRotaryEmbedding(f, self.n_heads, self.fk.rotary_attention_scaling)
                         for f in self.fk.inv_freq]

    def _lin(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self.w[f"{name}.weight"], self.w.get(f"{name}.bias"))

    def attention(self, i: int, x: torch.Tensor, positions: torch.Tensor,
                  keep: torch.Tensor | None = None, evict: tuple | None = None) -> torch.Tensor:
        """One layer's attention block on normalised input x [T, hidden] (before o_proj).
        ``evict=(policy, L)``: rows >= L see only this layer's kept prompt keys (evict_mask)."""
        p = f"transformer.h.{i}.attn" if self.gpt2 else f"model.layers.{i}.self_attn"
        r, t = self.fk.ranks[i], x.shape[0]
        q, k, v = (self._lin(x, f"{p}.{n}_proj") for n in "qkv")
        if self.rope is not None:
            q, k = self.rope[i](positions, q, k)
        k = k.view(t, self.n_kv, r)
        keep_from = 0
        if evict is not None:
            keep, keep_from = evict_mask(evict[0], k, evict[1]), evict[1]
        return thin_attention(q.view(t, self.n_heads, r), k, v.view(t, self.n_kv, self.head_dim),
                              self.fk.softmax_scale, keep, keep_from)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, evict: tuple | None = None) -> torch.Tensor:
        """input_ids [T] -> logits [T, vocab] (float32). ``evict=(policy, L)``: the first L
        tokens are the prompt, evicted per layer and KV head after its prefill (module doc)."""
        positions = torch.arange(input_ids.shape[0])
        return (self._gpt2 if self.gpt2 else self._llama)(input_ids, positions, evict).float()

    def _llama(self, ids: torch.Tensor, pos: torch.Tensor, evict: tuple | None = None) -> torch.Tensor:
        w, eps = self.w, self.cfg.get("rms_norm_eps", 1e-6)

        def rms(x: torch.Tensor, name: str) -> torch.Tensor:
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
            return w[name] * xf.to(x.dtype)

        x = w["model.embed_tokens.weight"][ids]
        for i in range(self.n_layers):
            p = f"model.layers.{i}"
            a = self.attention(i, rms(x, f"{p}.input_layernorm.weight"), pos, evict=evict)
            x = x + self._lin(a, f"{p}.self_attn.o_proj")
            hdn = rms(x, f"{p}.post_attention_layernorm.weight")
            act = ACT2FN[self.cfg.get("hidden_act", "silu")]
            mlp = act(self._lin(hdn, f"{p}.mlp.gate_proj")) * self._lin(hdn, f"{p}.mlp.up_proj")
            x = x + self._lin(mlp, f"{p}.mlp.down_proj")
        x = rms(x, "model.norm.weight")
        head = w.get("lm_head.weight", w["model.embed_tokens.weight"])
        return x @ head.T

    def _gpt2(self, ids: torch.Tensor, pos: torch.Tensor, evict: tuple | None = None) -> torch.Tensor:
        w, eps = self.w, self.cfg.get("layer_norm_epsilon", 1e-5)

        def ln(x: torch.Tensor, name: str) -> torch.Tensor:
            return F.layer_norm(x, (x.shape[-1],), w[f"{name}.weight"], w[f"{name}.bias"], eps)

        def conv1d(x: torch.Tensor, name: str) -> torch.Tensor:  # HF Conv1D: x @ W + b
            return x @ w[f"{name}.weight"] + w[f"{name}.bias"]

        act = ACT2FN[self.cfg.get("activation_function", "gelu_new")]
        x = w["transformer.wte.weight"][ids] + w["transformer.wpe.weight"][pos]
        for i in range(self.n_layers):
            p = f"transformer.h.{i}"
            a = self.attention(i, ln(x, f"{p}.ln_1"), pos, evict=evict)
            x = x + conv1d(a, f"{p}.attn.c_proj")
            x = x + conv1d(act(conv1d(ln(x, f"{p}.ln_2"), f"{p}.mlp.c_fc")), f"{p}.mlp.c_proj")
        x = ln(x, "transformer.ln_f")
        head = w.get("lm_head.weight", w["transformer.wte.weight"])
        return x @ head.T


@torch.no_grad()
def greedy_with_eviction(ref: FactoredReference, prompt_ids, policy, n_new: int
                         ) -> tuple[list[int], list[float]]:
    """Greedy continuation of prompt_ids (length L) with the prompt's KV evicted by ``policy``
    after prefill: token t_j = argmax logits_{L-1+j} of ref.forward(prompt + t_<j,
    evict=(policy, L)). Returns (n_new token ids, log p of each chosen token). The full
    sequence is re-run per token (tiny test models only)."""
    ids = [int(t) for t in prompt_ids]
    n_prompt, out, lps = len(ids), [], []
    for _ in range(n_new):
        logits = ref.forward(torch.tensor(ids + out), evict=(policy, n_prompt))[-1]
        lp = torch.log_softmax(logits.double(), dim=-1)
        nxt = int(logits.argmax())
        out.append(nxt)
        lps.append(lp[nxt].item())
    return out, lps
