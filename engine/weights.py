"""Reading checkpoint tensors: safetensors directories, and GPT-2's original layout.

An ordinary GPT-2 checkpoint fuses q/k/v into one Conv1D ``c_attn`` and may omit the
``transformer.`` prefix; a factored one stores q/k/v_proj in Linear layout
(docs/checkpoint-format.md). :func:`gpt2_state` brings the first to the second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.checkpoint import GPT2_ARCH, model_dims, read_config


class ModelFormatError(ValueError):
    """A checkpoint this model cannot run (one-line message)."""


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the *.safetensors files of a checkpoint directory."""
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def load_checkpoint(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, tensors) of a checkpoint directory."""
    return read_config(path, ModelFormatError), load_state_dict(path)


def is_gpt2(cfg: dict) -> bool:
    arch = (cfg.get("architectures") or [""])[0]
    return arch == GPT2_ARCH or arch.startswith("GPT2") or cfg.get("model_type") == "gpt2"


def split_gpt2_qkv(state: dict[str, torch.Tensor], i: int, hidden: int) -> dict[str, torch.Tensor]:
    """GPT-2's fused Conv1D c_attn of layer i as Linear-layout q/k/v_proj weights and biases."""
    p = f"transformer.h.{i}.attn"
    w, b = state[f"{p}.c_attn.weight"].T, state[f"{p}.c_attn.bias"]       # [3*hidden, hidden]
    return {f"{p}.{n}_proj.{t}": x[j * hidden:(j + 1) * hidden].contiguous()
            for j, n in enumerate("qkv") for t, x in (("weight", w), ("bias", b))}


def gpt2_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 tensors under ``transformer.`` (HF may save them without it), without the
    attention-mask buffers (``attn.bias``, ``attn.masked_bias``)."""
    return {k if k.startswith(("transformer.", "lm_head")) else f"transformer.{k}": v
            for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}


def gpt2_state(cfg: dict, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An ordinary GPT-2 state dict in the factored layout: names under ``transformer.``,
    no attention-mask buffers, c_attn split into q/k/v_proj (a factored one is returned as is)."""
    sd = gpt2_names(state)
    n_layers, _, _, _, hidden = model_dims(cfg)
    for i in range(n_layers):
        if f"transformer.h.{i}.attn.c_attn.weight" in sd:
            sd.update(split_gpt2_qkv(sd, i, hidden))
            del sd[f"transformer.h.{i}.attn.c_attn.weight"], sd[f"transformer.h.{i}.attn.c_attn.bias"]
    return sd
