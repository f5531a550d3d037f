"""Read ordinary HF checkpoints and write factored ones (docs/checkpoint-format.md).

`write_full_rank(src, dst)` is the exact copy (r = D) used to test the engine
against the original model. `write_rotary_pair_subset(src, dst, rank)` keeps r/2
of each KV head's rotary pairs (exact absorption under RoPE for those pairs:
scores lose the dropped pairs' terms, nothing else). Both go through
`write_factored`, which the calibrating converter reuses.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from engine.checkpoint import (BLOCK, GPT2_ARCH, LLAMA_ARCH, FactoredKeysConfig, model_dims,
                               read_config, validate_checkpoint_dir)
from engine.rotary import source_inv_freq
from engine.weights import gpt2_names, load_state_dict, split_gpt2_qkv

LLAMA_SOURCES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"}
GPT2_SOURCES = {"GPT2LMHeadModel"}
# Everything in a model dir that is not weights or config: tokenizer, chat template, etc.
_SKIP_FILES = {"config.json", "model.safetensors.index.json"}


class ConversionError(ValueError):
    """Bad converter input; the message is one line."""


def read_source(src: str | Path) -> tuple[dict, dict[str, torch.Tensor], str]:
    """(config, state dict, family) of an HF safetensors checkpoint; family is 'llama' or 'gpt2'."""
    src = Path(src)
    cfg = read_config(src, ConversionError)
    arch = (cfg.get("architectures") or [""])[0]
    if BLOCK in cfg:
        raise ConversionError(f"{src} is already a factored checkpoint ({arch})")
    if arch in LLAMA_SOURCES:
        family = "llama"
    elif arch in GPT2_SOURCES:
        family = "gpt2"
    else:
        raise ConversionError(f"{src}: unsupported architecture {arch!r}; supported: "
                              f"{sorted(LLAMA_SOURCES | GPT2_SOURCES)}")
    if not list(src.glob("*.safetensors")):
        raise ConversionError(f"{src}: no *.safetensors weights")
    try:
        sd = load_state_dict(src)
    except Exception as e:  # noqa: BLE001 - corrupt/truncated file
        raise ConversionError(f"{src}: unreadable safetensors weights ({e})") from None
    if family == "gpt2":
        sd = gpt2_names(sd)
    return cfg, sd, family


def write_checkpoint(src: str | Path, dst: str | Path, cfg: dict, state: dict[str, torch.Tensor],
                     *, force: bool = False, validate: Callable[[Path], object] | None = None
                     ) -> Path:
    """Write an HF checkpoint directory atomically: tokenizer and other non-weight files of
    src, `state` as model.safetensors and `cfg` as config.json (last) into a temp dir next to
    dst, `validate(tmp)`, then rename. A kill leaves at most a `.<dst>.tmp-*` sibling."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists (pass --force to replace it)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        for f in src.iterdir():
            if f.is_file() and f.name not in _SKIP_FILES and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        # config.json last: a directory without it is never mistaken for a checkpoint.
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if validate is not None:
            validate(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def write_factored(src: str | Path, dst: str | Path, *, cfg: dict, family: str,
                   state: dict[str, torch.Tensor], fk: FactoredKeysConfig,
                   force: bool = False) -> Path:
    """Write a factored checkpoint atomically (write_checkpoint), validated: `cfg` (the
    source's config) with the factored architecture and `fk.to_block()`. `state` is the
    complete new state dict."""
    dst = Path(dst)
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists (pass --force to replace it)")
    new_cfg = dict(cfg)
    new_cfg["architectures"] = [GPT2_ARCH if family == "gpt2" else LLAMA_ARCH]
    new_cfg[BLOCK] = fk.to_block()
    FactoredKeysConfig.from_hf_config(new_cfg)  # validate before writing anything
    return write_checkpoint(src, dst, new_cfg, state, force=force,
                            validate=validate_checkpoint_dir)


def select_dims(family: str, head_dim: int, rank: int,
                pairs: Callable[[int, int], list[int]] | None = None,
                layer: int = 0, kv_head: int = 0) -> list[int]:
    """Indices of the kept head dims for one KV head. With RoPE, kept pairs j keep dims j and
    j + D/2 and the thin layout is [j_0..j_{r/2-1}, j_0+D/2..]; without RoPE, the first r dims."""
    if family == "gpt2":
        return list(range(rank))
    half = head_dim // 2
    js = pairs(layer, kv_head) if pairs else list(range(rank // 2))
    return list(js) + [j + half for j in js]


def write_rotary_pair_subset(src: str | Path, dst: str | Path, rank: int, *,
                             pairs: Callable[[int, int], list[int]] | None = None,
                             method: str | None = None, force: bool = False) -> Path:
    """Keep r/2 rotary pairs per KV head (default: the first r/2, i.e. the highest
    frequencies; `pairs(layer, kv_head)` picks others). r = D is the exact full-rank copy."""
    src = Path(src)
    cfg, sd, family = read_source(src)
    n_layers, h, h_kv, d, hidden = model_dims(cfg)
    g = h // h_kv
    if not 1 <= rank <= d:
        raise ConversionError(f"--key-rank {rank} is outside 1..head_dim ({d})")
    if family == "llama" and rank % 2:
        raise ConversionError(f"--key-rank {rank} is odd, but RoPE needs pairs of dims")
    state = dict(sd)
    inv_all = None
    scaling = 1.0
    if family == "llama":
        inv, scaling = source_inv_freq(cfg)
        inv_all = []
    for i in range(n_layers):
        if family == "gpt2":
            qkv = split_gpt2_qkv(sd, i, hidden)
            del state[f"transformer.h.{i}.attn.c_attn.weight"], state[f"transformer.h.{i}.attn.c_attn.bias"]
            state.update(qkv)
            p = f"transformer.h.{i}.attn"
        else:
            p = f"model.layers.{i}.self_attn"
        wq = state[f"{p}.q_proj.weight"].view(h, d, hidden)
        wk = state[f"{p}.k_proj.weight"].view(h_kv, d, hidden)
        bq, bk = state.get(f"{p}.q_proj.bias"), state.get(f"{p}.k_proj.bias")
        q_rows, k_rows, layer_freq = [], [], []
        for kvh in range(h_kv):
            idx = torch.tensor(select_dims(family, d, rank, pairs, i, kvh))
            k_rows.append(kvh * d + idx)
            q_rows.extend(qh * d + idx for qh in range(kvh * g, (kvh + 1) * g))
            if family == "llama":
                layer_freq.append(inv[idx[: rank // 2]].tolist())
        q_idx, k_idx = torch.cat(q_rows), torch.cat(k_rows)
        state[f"{p}.q_proj.weight"] = wq.reshape(h * d, hidden)[q_idx]
        state[f"{p}.k_proj.weight"] = wk.reshape(h_kv * d, hidden)[k_idx]
        if bq is not None:
            state[f"{p}.q_proj.bias"] = bq[q_idx]
        if bk is not None:
            state[f"{p}.k_proj.bias"] = bk[k_idx]
        if inv_all is not None:
            inv_all.append(layer_freq)
    if method is None:
        method = "full-rank" if rank == d else "rotary-pair-subset"
    fk = FactoredKeysConfig.build(cfg, rank, inv_all, method=method,
                                  source_model=cfg.get("_name_or_path") or src.name,
                                  rotary_attention_scaling=scaling)
    return write_factored(src, dst, cfg=cfg, family=family, state=state, fk=fk, force=force)


def write_full_rank(src: str | Path, dst: str | Path, force: bool = False) -> Path:
    """Exact factored copy (r = head_dim) of a supported HF checkpoint."""
    cfg, _, _ = read_source(src)
    return write_rotary_pair_subset(src, dst, model_dims(cfg)[3], force=force)

