"""Shared pieces of the thin-key attention modules: config parsing and TP head bookkeeping."""

from __future__ import annotations

from typing import Any

import torch

from engine.checkpoint import FactoredKeysConfig

_CACHE_ATTR = "_factorkv_factored_keys"


def factored_keys(config: Any) -> FactoredKeysConfig:
    """The validated factored-keys block of an HF config (parsed once per config object)."""
    fk = getattr(config, _CACHE_ATTR, None)
    if fk is None:
        fk = FactoredKeysConfig.from_hf_config(config)
        object.__setattr__(config, _CACHE_ATTR, fk)
    return fk


def max_model_len() -> int | None:
    """The engine's max_model_len (rotary tables are precomputed up to it), None outside one."""
    from vllm.config import get_current_vllm_config
    mc = get_current_vllm_config().model_config
    return getattr(mc, "max_model_len", None) if mc is not None else None


def local_kv_heads(total_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Global indices of the KV heads held by this tensor-parallel rank (vLLM's QKV split)."""
    if total_kv_heads >= tp_size:
        n = total_kv_heads // tp_size
        return list(range(tp_rank * n, (tp_rank + 1) * n))
    return [tp_rank // (tp_size // total_kv_heads)]


def local_inv_freq(fk: FactoredKeysConfig, layer: int, kv_heads: list[int]) -> torch.Tensor | None:
    if fk.inv_freq is None:
        return None
    return fk.inv_freq[layer][kv_heads]
