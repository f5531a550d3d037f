"""Convert an HF Llama-family or GPT-2-family checkpoint to factored keys (latent or thin).

    convert(src, dst, key_rank=16)                          # latent keys (Llama default)
    convert(src, dst, key_rank=16, keys="thin", init="best-pairs", calibrate=True)
    convert(src, dst, kv_heads=1)                           # KV head merging only (GQA output)
    convert(src, dst, kv_heads=1, key_rank=32)              # merge first, then factor keys

1. Calibration statistics (model_patches.conversion.activation_stats): the source model runs
   on calibration text (the gensim Wikipedia calibration split, disjoint from evaluation)
   and the second moment C_x = E[x xᵀ] of every layer's attention input is accumulated
   (latent --init *-attn: weighted by the attention each token receives).
2. Initialisation, layer by layer. keys="latent" (the default for the Llama family):
   model_patches.conversion.latent_init (PCA of the pre-RoPE keys, --init pca|qpca|pca-attn|qpca-attn) gives each layer's latent
   projection A (k_proj) and reconstruction B (k_up_proj); queries, values and RoPE stay the
   source's. keys="thin" (the default for GPT-2, where it is exact algebra):
   model_patches.conversion.thin_init (data-aware whitened SVD, rotary pair choice) gives each
   KV head's thin key rows, the absorbed query rows and the RoPE frequency table of the thin dims.
3. Optional calibration (model_patches.conversion.calibrate): QK-only recovery against the source.
4. Written atomically through model_patches.conversion.checkpoint_writer.write_factored, with
   the factored-keys block as an engine.checkpoint.FactoredKeysConfig.

With kv_heads=N, model_patches.conversion.head_merge first merges the KV heads (a standard GQA
checkpoint; alone, that is the output), optionally recovered against the source
(recover=..., model_patches.conversion.calibrate.recover_merged). With a key rank too, the merged model is written to
a temp dir next to dst and factored from there by steps 1-4 (calibration then distils
against the merged model), and the temp dir is removed.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from engine.checkpoint import FactoredKeysConfig, model_dims
from engine.kv_layout import KVLayout
from engine.rotary import source_inv_freq
from engine.weights import split_gpt2_qkv
from model_patches.conversion import head_merge
from model_patches.conversion.activation_stats import DEFAULT_STAT_TOKENS, input_moments
from model_patches.conversion.calibrate import calibrate_thin_qk, check_calibration
from model_patches.conversion.distill import cleanup
from model_patches.conversion.checkpoint_writer import ConversionError, read_source, write_factored
from model_patches.conversion.latent_init import (LATENT_INITS, init_latent_state, init_options,
                                                   latent_rotary_table)
from model_patches.conversion.thin_init import METHODS, head_moments, init_head

DEFAULT_INIT = "partial-rope"
KEY_FORMS = ("latent", "thin")


@dataclass
class ConvertSummary:
    dst: Path
    ranks: list[int]
    head_dim: int
    kv_bytes_per_token: int
    baseline_kv_bytes_per_token: int
    kv_heads: tuple[int, int] | None = None        # (source, merged) with --kv-heads

    def lines(self) -> list[str]:
        r = self.ranks[0] if len(set(self.ranks)) == 1 else self.ranks
        cut = 1 - self.kv_bytes_per_token / self.baseline_kv_bytes_per_token
        merged = [] if self.kv_heads is None else [
            f"KV heads {self.kv_heads[0]} -> {self.kv_heads[1]} (merged before factoring)"]
        return [f"wrote {self.dst}", *merged,
                f"key rank r = {r} of head_dim {self.head_dim} "
                f"(key cache cut {1 - sum(self.ranks) / (len(self.ranks) * self.head_dim):.1%})",
                f"KV cache bytes per token (fp16): {self.baseline_kv_bytes_per_token:,} -> "
                f"{self.kv_bytes_per_token:,} ({cut:.1%} smaller, "
                f"{self.baseline_kv_bytes_per_token / self.kv_bytes_per_token:.2f}x tokens per byte)"]


def resolve_keys(family: str, keys: str | None, init: str | None, latent_groups: int | None,
                 cfg: dict) -> tuple[str, str, int]:
    """(keys, init method (thin_init.METHODS or latent_init.LATENT_INITS), latent groups) with
    the defaults filled in and checked:
    latent keys for the Llama family, thin keys (exact without RoPE) for GPT-2."""
    keys = keys or ("thin" if family == "gpt2" else "latent")
    if keys not in KEY_FORMS:
        raise ConversionError(f"--keys {keys!r} is not one of {', '.join(KEY_FORMS)}")
    if keys == "latent":
        if family == "gpt2":
            raise ConversionError("--keys latent needs a Llama-family source (GPT-2 has no RoPE: "
                                  "thin keys are already exact there; use --keys thin)")
        init = init or LATENT_INITS[0]
        if init not in LATENT_INITS:
            raise ConversionError(f"--init {init!r} is not a latent-key initialisation (choose "
                                  f"from {', '.join(LATENT_INITS)}, or pass --keys thin)")
        h_kv = model_dims(cfg)[2]
        groups = 1 if latent_groups is None else latent_groups
        if groups < 1 or h_kv % groups:
            raise ConversionError(f"--latent-groups {groups} must divide the {h_kv} KV heads")
        return keys, init, groups
    if latent_groups is not None:
        raise ConversionError("--latent-groups applies to --keys latent")
    init = init or DEFAULT_INIT
    if init not in METHODS:
        raise ConversionError(f"--init {init!r} is not one of {', '.join(METHODS)}")
    return keys, init, 1


def resolve_rank(cfg: dict, key_rank: int | None, key_cache_ratio: float | None,
                 family: str, pairs: bool = True) -> int:
    """The key rank per KV head from --key-rank or --key-cache-ratio (kept fraction of key
    dims); with RoPE on the thin dims (``pairs``) it must be even."""
    d = model_dims(cfg)[3]
    pairs = pairs and family == "llama"
    if (key_rank is None) == (key_cache_ratio is None):
        raise ConversionError("give exactly one of --key-rank or --key-cache-ratio")
    if key_cache_ratio is not None:
        if not (0 < key_cache_ratio <= 1) or math.isnan(key_cache_ratio):
            raise ConversionError(f"--key-cache-ratio {key_cache_ratio} must be in (0, 1]")
        key_rank = max(1, round(key_cache_ratio * d))
        if pairs and key_rank % 2:
            key_rank += 1
    if not 1 <= key_rank <= d:
        raise ConversionError(f"--key-rank {key_rank} is outside 1..head_dim ({d})")
    if pairs and key_rank % 2:
        raise ConversionError(f"--key-rank {key_rank} is odd, but RoPE needs pairs of dims")
    return key_rank


def init_thin_state(cfg: dict, sd: dict[str, torch.Tensor], family: str, rank: int, init: str,
                    moments: list[torch.Tensor], progress: bool = True, src_name: str = "source"
                    ) -> tuple[dict[str, torch.Tensor], list | None, float]:
    """New state dict with thin q/k projections for every layer, the [layer][kv_head][r/2]
    frequency table (None without RoPE) and the rotary attention scaling."""
    n_layers, h, h_kv, d, hidden = model_dims(cfg)
    g = h // h_kv
    state = dict(sd)
    inv, scaling, base = None, 1.0, None
    if family == "llama":
        inv, scaling = source_inv_freq(cfg)
        base = (cfg.get("rope_parameters") or {}).get("rope_theta", cfg.get("rope_theta", 10000.0))
    table = [] if family == "llama" else None
    for i in tqdm(range(n_layers), desc=f"thin init ({init}, r={rank})", unit="layer",
                  disable=not progress):
        if family == "gpt2":
            state.update(split_gpt2_qkv(sd, i, hidden))
            del state[f"transformer.h.{i}.attn.c_attn.weight"], state[f"transformer.h.{i}.attn.c_attn.bias"]
            p = f"transformer.h.{i}.attn"
        else:
            p = f"model.layers.{i}.self_attn"
        wq = state[f"{p}.q_proj.weight"].view(h, d, hidden).double()
        wk = state[f"{p}.k_proj.weight"].view(h_kv, d, hidden).double()
        bq, bk = state.get(f"{p}.q_proj.bias"), state.get(f"{p}.k_proj.bias")
        if family == "llama" and bk is not None:
            raise ConversionError(f"{src_name}: a key bias under RoPE cannot be absorbed; "
                                  "converting models with attention biases is not supported yet")
        qs, ks, qb, freqs = [], [], [], []
        for kv in range(h_kv):
            group = slice(kv * g, (kv + 1) * g)
            cq, ck = head_moments(wq[group], wk[kv], moments[i])
            head = init_head(cq, ck, rank, init, inv, base)
            qs.append(torch.einsum("dr,gdh->grh", head.u, wq[group]).reshape(g * rank, hidden))
            ks.append(head.vt @ wk[kv])
            if bq is not None:
                qb.append((head.u.T @ bq.view(h, d)[group].double().T).T.reshape(-1))
            if head.inv_freq is not None:
                freqs.append(head.inv_freq.tolist())
        state[f"{p}.q_proj.weight"] = torch.cat(qs).float()
        state[f"{p}.k_proj.weight"] = torch.cat(ks).float()
        if bq is not None:
            state[f"{p}.q_proj.bias"] = torch.cat(qb).float()
        if bk is not None:
            # no RoPE: q·b_k is the same for every key of a query and cancels in the softmax
            state[f"{p}.k_proj.bias"] = torch.zeros(h_kv * rank)
        if table is not None:
            table.append(freqs)
    return state, table, scaling


def convert(src: str | Path, dst: str | Path, *, key_rank: int | None = None,
            key_cache_ratio: float | None = None, kv_heads: int | None = None,
            merge_keys: str = "complex", recover: dict | None = None, init: str | None = None,
            keys: str | None = None, latent_groups: int | None = None,
            calibrate: bool = False, stat_tokens: int = DEFAULT_STAT_TOKENS,
            calibration: dict | None = None, force: bool = False,
            progress: bool = True) -> ConvertSummary | head_merge.MergeSummary:
    """Write a factored checkpoint of `src` at `dst` (see the module docstring); with only
    `kv_heads`, the merged GQA checkpoint (returns a head_merge.MergeSummary). recover (with
    kv_heads): settings of the merged model's recovery (calibrate.recover_merged), {} = defaults.
    keys: "latent" or "thin" (None: latent for the Llama family, thin for GPT-2); init: the
    initialisation (thin_init.METHODS, latent_init.LATENT_INITS); latent_groups: latents per layer (default 1)."""
    src, dst = Path(src), Path(dst)
    if init is not None and init not in METHODS + LATENT_INITS:
        raise ConversionError(f"--init {init!r} is not one of {', '.join(METHODS + LATENT_INITS)}")
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists (pass --force to replace it)")
    factor = key_rank is not None or key_cache_ratio is not None
    if kv_heads is None and not factor:
        raise ConversionError("give --key-rank, --key-cache-ratio or --kv-heads")
    if recover is not None and kv_heads is None:
        raise ConversionError("--recover trains merged KV heads: it needs --kv-heads")
    if kv_heads is not None:
        return _merge_then_factor(src, dst, kv_heads, merge_keys, factor, recover,
                                  key_rank=key_rank,
                                  key_cache_ratio=key_cache_ratio, init=init, keys=keys,
                                  latent_groups=latent_groups,
                                  calibrate=calibrate, stat_tokens=stat_tokens,
                                  calibration=calibration, force=force, progress=progress)
    cfg, sd, family = read_source(src)
    keys, init, groups = resolve_keys(family, keys, init, latent_groups, cfg)
    rank = resolve_rank(cfg, key_rank, key_cache_ratio, family, pairs=keys == "thin")
    if calibrate:       # fail on a calibration set the texts cannot fill before any work
        check_calibration(src, calibration or {})
    attention_weighted, query_weighted = init_options(init) if keys == "latent" else (False, False)
    moments = input_moments(src, stat_tokens, progress=progress,
                            attention_weighted=attention_weighted)
    if keys == "latent":
        state = init_latent_state(cfg, sd, rank, groups, moments, progress,
                                  query_weighted=query_weighted)
        table, scaling = latent_rotary_table(cfg)
        method = f"latent-{init}"
    else:
        state, table, scaling = init_thin_state(cfg, sd, family, rank, init, moments, progress,
                                               src.name)
        method = f"{init}" if family == "llama" else "whitened-svd"
    merge = cfg.get("kv_head_merge")
    if merge:           # a merged model (head_merge): say so, and name the real source
        method = f"kv-merge-{merge['merge_keys']}+{method}"
    fk = FactoredKeysConfig.build(
        cfg, rank, table, method=method, rotary_attention_scaling=scaling,
        source_model=(merge or {}).get("source_model") or cfg.get("_name_or_path") or src.name,
        kv_head_merge=merge or None, key_mode=keys, latent_groups=groups)
    if calibrate:       # a new config: method +calibrated, the report (and learned frequencies)
        state, fk = calibrate_thin_qk(src, cfg, family, state, fk, dst=dst, progress=progress,
                                      **(calibration or {}))
    write_factored(src, dst, cfg=cfg, family=family, state=state, fk=fk, force=force)
    if calibrate:
        cleanup(dst)
    kv = KVLayout.of_factored(fk, "fp16")
    return ConvertSummary(dst, list(fk.ranks), fk.head_dim, kv.bytes_per_token,
                          kv.baseline_bytes_per_token)


def _merge_then_factor(src: Path, dst: Path, kv_heads: int, merge_keys: str, factor: bool,
                       recover: dict | None, *, key_rank, key_cache_ratio, init, keys,
                       latent_groups, calibrate, stat_tokens, calibration,
                       force, progress) -> ConvertSummary | head_merge.MergeSummary:
    """--kv-heads [--key-rank R]: every argument is checked before any work; the merged model
    goes to dst directly, or to a temp dir next to dst that the factoring reads."""
    cfg, _, family = read_source(src)
    head_merge.check_kv_heads(cfg, family, kv_heads, merge_keys)
    if not factor:
        if calibrate or calibration:
            raise ConversionError("--calibrate calibrates thin keys: it needs --key-rank or "
                                  "--key-cache-ratio (--recover trains the merged heads)")
        return head_merge.merge_kv_heads(src, dst, kv_heads, merge_keys=merge_keys, recover=recover,
                              stat_tokens=stat_tokens, force=force, progress=progress)
    merged_cfg = {**cfg, "num_key_value_heads": kv_heads}
    keys, _, _ = resolve_keys(family, keys, init, latent_groups, merged_cfg)
    resolve_rank(cfg, key_rank, key_cache_ratio, family, pairs=keys == "thin")
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-merge-", dir=dst.parent))
    try:
        merged = head_merge.merge_kv_heads(src, work / "merged", kv_heads, merge_keys=merge_keys,
                                recover=recover, stat_tokens=stat_tokens, progress=progress)
        summary = convert(merged.dst, dst, key_rank=key_rank, key_cache_ratio=key_cache_ratio,
                          init=init, keys=keys, latent_groups=latent_groups, calibrate=calibrate, stat_tokens=stat_tokens,
                          calibration=calibration, force=force, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    summary.baseline_kv_bytes_per_token = merged.baseline_kv_bytes_per_token
    summary.kv_heads = merged.kv_heads
    return summary


__all__ = ["convert", "ConvertSummary", "ConversionError", "resolve_rank", "init_thin_state"]
