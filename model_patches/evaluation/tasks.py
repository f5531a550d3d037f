"""Quality metrics of factored (thin-key) Llama-family models, in plain batched torch.

* :class:`ThinLM`: a batched, KV-cached forward of an original or a factored Llama-family
  checkpoint (the same math as ``engine.reference``, which is unbatched and uncached). An
  original checkpoint is run as its exact full-rank factoring (r = head_dim, source RoPE).
  Its thin q/k weights can be made trainable (end-to-end calibration uses it).
* :func:`perplexity`: non-overlapping windows of ``ctx`` tokens; every token of a window but
  the first is scored with the window as its only context; PPL = exp(Σ NLL / #scored).
* :func:`passkey_prompts` / :func:`passkey_accuracy`: filler text with
  "The pass key is NNNNN. Remember it." at a random depth and a question at the end; greedy;
  exact match of the 5 digits. Prompts are built from token pieces (deterministic for a
  seed), and they share the filler prefix, so the filler's KV cache is computed once.
* :func:`greedy_chat`: greedy answers to chat prompts (the model's chat template).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.checkpoint import BLOCK, FactoredKeysConfig, model_dims
from engine.rotary import ThinRotaryEmbedding


class EvalError(ValueError):
    """A user-fixable evaluation problem (one-line message)."""


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from engine.reference import load_state_dict
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"{path}: no readable config.json ({e})") from None
    return cfg, load_state_dict(path)


class ThinLM(torch.nn.Module):
    """Llama-family causal LM with (possibly) thin keys; batched, with an optional KV cache.

    ``ThinLM(cfg, state)``: cfg is the checkpoint's config.json (a factored one, or an original
    Llama/Mistral/Qwen2 one = full rank); state its tensors (shared, not copied).
    ``trainable``: attention projections whose weights become trainable parameters (e.g.
    ("q_proj", "k_proj") for the thin q/k; all four for a merged model's recovery)."""

    def __init__(self, cfg: dict, state: dict[str, torch.Tensor],
                 trainable: tuple[str, ...] = ()):
        super().__init__()
        arch = (cfg.get("architectures") or [""])[0]
        if "GPT2" in arch:
            raise EvalError(f"{arch}: the quality benchmark supports Llama-family models only")
        self.cfg = cfg
        self.n_layers, self.h, self.h_kv, self.d, self.hidden = model_dims(cfg)
        if BLOCK in cfg:
            fk = FactoredKeysConfig.from_hf_config(cfg)
            self.ranks, self.scale = list(fk.ranks), fk.softmax_scale
            tables, scaling = list(fk.inv_freq), fk.rotary_attention_scaling
        else:
            from model_patches.conversion.checkpoint_writer import source_inv_freq
            inv, scaling = source_inv_freq(cfg)
            self.ranks, self.scale = [self.d] * self.n_layers, self.d ** -0.5
            tables = [inv[None].expand(self.h_kv, -1).double()] * self.n_layers
        self.rope = [ThinRotaryEmbedding(t, self.h, scaling) for t in tables]
        self.eps = cfg.get("rms_norm_eps", 1e-6)
        self.w = state
        p = "model.layers.{}.self_attn"
        self.trainable = tuple(trainable)
        self.trained = torch.nn.ParameterList(
            torch.nn.Parameter(state[f"{p.format(i)}.{n}.weight"].float())
            for i in range(self.n_layers) for n in self.trainable)
        self.qb = [state.get(f"{p.format(i)}.q_proj.bias") for i in range(self.n_layers)]
        self.kb = [state.get(f"{p.format(i)}.k_proj.bias") for i in range(self.n_layers)]
        self.head = state.get("lm_head.weight", state["model.embed_tokens.weight"])
        from transformers.activations import ACT2FN
        self.act = ACT2FN[cfg.get("hidden_act", "silu")]

    @classmethod
    def from_dir(cls, path: str | Path) -> "ThinLM":
        cfg, state = load_checkpoint(path)
        return cls(cfg, state)

    def to_device(self, device: torch.device | str) -> "ThinLM":
        """Move every tensor (checkpoint weights, rotary tables, trainable copies) to device;
        the state dict given to the constructor is no longer shared afterwards."""
        self.w = {k: v.to(device) for k, v in self.w.items()}
        self.qb = [None if b is None else b.to(device) for b in self.qb]
        self.kb = [None if b is None else b.to(device) for b in self.kb]
        self.head = self.w.get("lm_head.weight", self.w["model.embed_tokens.weight"])
        for rope in self.rope:
            rope.to(device)
        self.trained.to(device)
        return self

    def _proj(self, i: int, name: str) -> torch.Tensor:
        """Layer i's attention projection weight (the trainable copy if there is one)."""
        if name in self.trainable:
            return self.trained[i * len(self.trainable) + self.trainable.index(name)]
        return self.w[f"model.layers.{i}.self_attn.{name}.weight"]

    def trained_state(self) -> dict[str, torch.Tensor]:
        """The trainable projection weights, as checkpoint tensors."""
        return {f"model.layers.{i}.self_attn.{n}.weight": self._proj(i, n).detach().cpu().clone()
                for i in range(self.n_layers) for n in self.trainable}

    def _rms(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return self.w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))

    def hidden_states(self, ids: torch.Tensor, cache: list | None = None,
                      pos0: int | None = None) -> torch.Tensor:
        """ids [B, T] -> final normed hidden states [B, T, hidden]. ``cache``: a list that
        holds (k, v) per layer ([B, H_kv, S, r], [B, H_kv, S, D], k after RoPE); it is read
        (S earlier positions; S may differ per layer) and extended in place. ``pos0``: the
        RoPE position of ids[:, 0] (default: layer 0's S; larger after a compacting KV
        eviction)."""
        b, t = ids.shape
        start = cache[0][0].shape[2] if cache else 0
        pos0 = start if pos0 is None else pos0
        pos = torch.arange(pos0, pos0 + t, device=ids.device)
        masks: dict[int, torch.Tensor | None] = {}
        x = self.w["model.embed_tokens.weight"][ids]
        for i in range(self.n_layers):
            p, r = f"model.layers.{i}", self.ranks[i]
            n = self._rms(x, f"{p}.input_layernorm.weight")
            q = F.linear(n, self._proj(i, "q_proj"), self.qb[i])
            k = F.linear(n, self._proj(i, "k_proj"), self.kb[i])
            v = F.linear(n, self._proj(i, "v_proj"), self.w.get(f"{p}.self_attn.v_proj.bias"))
            q, k = self.rope[i](pos.repeat(b), q.reshape(b * t, -1), k.reshape(b * t, -1))
            q = q.view(b, t, self.h, r).transpose(1, 2)
            k = k.view(b, t, self.h_kv, r).transpose(1, 2)
            v = v.view(b, t, self.h_kv, self.d).transpose(1, 2)
            if cache is not None:
                if len(cache) > i:
                    k = torch.cat((cache[i][0], k), 2)
                    v = torch.cat((cache[i][1], v), 2)
                    cache[i] = (k, v)
                else:
                    cache.append((k, v))
            s = k.shape[2] - t               # earlier positions in this layer's cache
            if s not in masks:               # queries s+i see keys 0..s+i
                masks[s] = (torch.ones(t, s + t, dtype=torch.bool, device=ids.device).tril(s)
                            if s and t > 1 else None)
            mask = masks[s]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                               is_causal=mask is None and t > 1,
                                               scale=self.scale, enable_gqa=self.h != self.h_kv)
            x = x + F.linear(o.transpose(1, 2).reshape(b, t, self.h * self.d),
                             self._proj(i, "o_proj"), self.w.get(f"{p}.self_attn.o_proj.bias"))
            n = self._rms(x, f"{p}.post_attention_layernorm.weight")
            m = self.act(F.linear(n, self.w[f"{p}.mlp.gate_proj.weight"])) * \
                F.linear(n, self.w[f"{p}.mlp.up_proj.weight"])
            x = x + F.linear(m, self.w[f"{p}.mlp.down_proj.weight"])
        return self._rms(x, "model.norm.weight")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.head.T

    def forward(self, ids: torch.Tensor, cache: list | None = None) -> torch.Tensor:
        return self.logits(self.hidden_states(ids, cache))


def crop_cache(cache: list, length: int) -> list:
    """A view of the first ``length`` positions of a KV cache (the original is untouched)."""
    return [(k[:, :, :length], v[:, :, :length]) for k, v in cache]


def token_nll(model: ThinLM, hidden: torch.Tensor, targets: torch.Tensor,
              chunk: int = 1024) -> torch.Tensor:
    """-log p(targets) for hidden [N, hidden] and targets [N] (lm_head in chunks)."""
    out = []
    for s in range(0, hidden.shape[0], chunk):
        lg = model.logits(hidden[s:s + chunk]).float()
        out.append(F.cross_entropy(lg, targets[s:s + chunk], reduction="none"))
    return torch.cat(out)


def eval_windows(stream: list[int] | torch.Tensor, ctx: int, n_tokens: int) -> torch.Tensor:
    """Non-overlapping windows [N, ctx] covering at least n_tokens tokens of ``stream``."""
    n = math.ceil(n_tokens / ctx)
    ids = torch.as_tensor(stream, dtype=torch.long)
    if len(ids) < n * ctx:
        raise EvalError(f"evaluation text has {len(ids)} tokens, {n * ctx} needed")
    return ids[: n * ctx].view(n, ctx)


@torch.no_grad()
def window_nll(model: ThinLM, windows: torch.Tensor, batch: int = 1,
               progress=None) -> torch.Tensor:
    """NLL [N, ctx-1] of every token but the first of each window."""
    out = []
    for s in range(0, len(windows), batch):
        w = windows[s:s + batch]
        hs = model.hidden_states(w)[:, :-1]
        nll = token_nll(model, hs.reshape(-1, hs.shape[-1]), w[:, 1:].reshape(-1))
        out.append(nll.view(len(w), -1))
        if progress is not None:
            progress.update(len(w))
    return torch.cat(out)


@torch.no_grad()
def perplexity(model: ThinLM, windows: torch.Tensor, batch: int = 1, progress=None) -> dict:
    nll = window_nll(model, windows, batch, progress).double()
    return {"ppl": math.exp(nll.mean().item()), "nll_sum": nll.sum().item(),
            "tokens_scored": nll.numel(), "windows": len(windows), "ctx": windows.shape[1]}


# ---------------------------------------------------------------------------- passkey
PASSKEY_HEAD = ("There is an important info hidden inside a lot of irrelevant text. "
                "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = (" The grass is green. The sky is blue. The sun is yellow."
                  " Here we go. There and back again.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    ids: list[int]
    answer: str
    needle_start: int      # token index where the needle's tokens start
    needle_len: int
    prefix_len: int        # ids[:prefix_len] is head + filler, shared by every prompt


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def passkey_prompts(tok, length: int, n: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``n`` prompts of at most ``length`` tokens (and more than length - one filler unit):
    head, filler, the needle after a random whole number of filler units, filler, question.
    Deterministic for (tokenizer, length, n, seed)."""
    rng = random.Random(f"passkey-{length}-{seed}")
    head, unit, question = _encode(tok, PASSKEY_HEAD), _encode(tok, PASSKEY_FILLER), \
        _encode(tok, PASSKEY_QUESTION)
    if tok.bos_token_id is not None:
        head = [tok.bos_token_id] + head
    out = []
    for _ in range(n):
        key = str(rng.randint(10000, 99999))
        needle = _encode(tok, PASSKEY_NEEDLE.format(key=key))
        units = (length - len(head) - len(needle) - len(question)) // len(unit)
        if units < 1:
            raise EvalError(f"passkey length {length} is too short for the prompt template")
        depth = rng.randint(0, units)
        before, after = unit * depth, unit * (units - depth)
        ids = head + before + needle + after + question
        out.append(PasskeyPrompt(ids, key, len(head) + len(before), len(needle),
                                 len(head) + len(before)))
    return out


def extract_passkey(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


@torch.no_grad()
def greedy(model: ThinLM, ids: list[int], max_new: int, cache: list | None = None,
           stop: set[int] | None = None) -> list[int]:
    """Greedy continuation of ids[len(cache):] given a cache of ids' first positions."""
    cache = [] if cache is None else list(cache)
    have = cache[0][0].shape[2] if cache else 0
    x = torch.tensor([ids[have:]])
    out: list[int] = []
    for _ in range(max_new):
        hs = model.hidden_states(x, cache)[:, -1]
        nxt = int(model.logits(hs).argmax(-1))
        out.append(nxt)
        if stop and nxt in stop:
            break
        x = torch.tensor([[nxt]])
    return out


@torch.no_grad()
def passkey_accuracy(model: ThinLM, tok, prompts: list[PasskeyPrompt], max_new: int = 8,
                     progress=None) -> dict:
    """Greedy answer per prompt; exact match of the first digit run with the 5-digit key."""
    longest = max(prompts, key=lambda p: p.prefix_len)
    shared = longest.ids[: longest.prefix_len]
    cache: list = []
    model.hidden_states(torch.tensor([shared]), cache)
    rows = []
    for p in prompts:
        assert p.ids[: p.prefix_len] == shared[: p.prefix_len]
        gen = greedy(model, p.ids, max_new, crop_cache(cache, p.prefix_len))
        text = tok.decode(gen, skip_special_tokens=True)
        rows.append({"answer": p.answer, "output": text, "depth": p.needle_start / len(p.ids),
                     "correct": extract_passkey(text) == p.answer})
        if progress is not None:
            progress.update(1)
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
            "length": max(len(p.ids) for p in prompts), "rows": rows}


def passkey_accuracy_vllm(ckpt: str | Path, tok, prompts: list[PasskeyPrompt], work: Path,
                          max_new: int = 8) -> dict:
    """:func:`passkey_accuracy` through the vLLM engine (greedy, prefix caching on: the shared
    filler prefix is computed once). Same scoring."""
    from model_patches.evaluation import vllm_check as evaluate_vllm
    longest = max(prompts, key=lambda p: p.prefix_len)
    out = evaluate_vllm.run(ckpt, None, work, spec_extra={
        "mode": "generate", "prompts": [p.ids for p in prompts], "max_tokens": max_new,
        "prefix": longest.ids[: longest.prefix_len]})
    rows = []
    for p, gen in zip(prompts, out["tokens"]):
        text = tok.decode(gen, skip_special_tokens=True)
        rows.append({"answer": p.answer, "output": text, "depth": p.needle_start / len(p.ids),
                     "correct": extract_passkey(text) == p.answer})
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
            "length": max(len(p.ids) for p in prompts), "rows": rows, "engine": "vllm",
            "engine_seconds": out["seconds"], "startup_s": out["startup_s"]}


# ---------------------------------------------------------------------------- chat
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Explain in two sentences what a CPU does.",
    "What is 12 plus 30?",
)


@torch.no_grad()
def greedy_chat(model: ThinLM, tok, prompts=CHAT_PROMPTS, max_new: int = 48) -> list[dict]:
    stop = {t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    out = []
    for q in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                      tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        gen = greedy(model, list(ids), max_new, stop=stop)
        out.append({"prompt": q, "answer": tok.decode(gen, skip_special_tokens=True).strip()})
    return out
