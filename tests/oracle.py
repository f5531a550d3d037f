"""An independent test oracle for engine.torch_model: a factored Llama-family checkpoint run
unbatched, uncached, with an explicit float32 softmax and a per-head loop (the old
engine.reference, cut to what the tests compare). Slow and literal on purpose; never used by
the product."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from engine.checkpoint import FactoredKeysConfig, model_dims
from engine.rotary import ThinRotaryEmbedding


@torch.no_grad()
def oracle_logits(path: str | Path, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] -> logits [T, vocab] of the factored Llama checkpoint at path."""
    path = Path(path)
    cfg = json.loads((path / "config.json").read_text())
    fk = FactoredKeysConfig.from_hf_config(cfg)
    n_layers, h, h_kv, d, _ = model_dims(cfg)
    w: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        w.update(load_file(str(f)))
    eps, t = cfg.get("rms_norm_eps", 1e-6), ids.shape[0]
    pos = torch.arange(t)

    def rms(x, name):
        return w[name] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def lin(x, name):
        return F.linear(x, w[f"{name}.weight"], w.get(f"{name}.bias"))

    x = w["model.embed_tokens.weight"][ids]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for i in range(n_layers):
        p, r = f"model.layers.{i}", fk.ranks[i]
        n = rms(x, f"{p}.input_layernorm.weight")
        q, k, v = (lin(n, f"{p}.self_attn.{m}_proj") for m in "qkv")
        rope = ThinRotaryEmbedding(fk.inv_freq[i], h, fk.rotary_attention_scaling)
        q, k = rope(pos, q, k)
        q, k, v = q.view(t, h, r), k.view(t, h_kv, r), v.view(t, h_kv, d)
        heads = []
        for j in range(h):
            g = j // (h // h_kv)
            s = (q[:, j] @ k[:, g].T).float() * fk.softmax_scale
            heads.append(torch.softmax(s.masked_fill(~causal, float("-inf")), -1) @ v[:, g])
        x = x + lin(torch.cat(heads, -1), f"{p}.self_attn.o_proj")
        n = rms(x, f"{p}.post_attention_layernorm.weight")
        act = F.silu(lin(n, f"{p}.mlp.gate_proj")) * lin(n, f"{p}.mlp.up_proj")
        x = x + lin(act, f"{p}.mlp.down_proj")
    x = rms(x, "model.norm.weight")
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T
