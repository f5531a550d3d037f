"""Compact one request's paged KV cache in place: keep the selected tokens, packed from slot 0.

For every attention layer and KV head h, with the request's blocks B and n cached tokens
(token j lives in block B[j // bs], offset j % bs):

    sel_h   = policy.select(policy.score(K_h[0:n]))   (engine/eviction/policy.py)
    K_h[j] <- K_h[sel_h[j]],  V_h[j] <- V_h[sel_h[j]]    for j < n_kept

All heads keep the same count, so afterwards the request's cache holds n_kept tokens in
its first ceil(n_kept / bs) blocks and the rest can be returned to vLLM's block pool.
Slot order does not matter to attention when RoPE was applied before the keys were cached.
Latent keys (FACTORKV_LATENT, same layout as thin keys) are rotated when read, at their
token's position: such a layer keeps one set of tokens for all heads (sel_h = sel), and the
worker hands the kept positions to the attention backend (engine/eviction/worker.py).

A layer's cache is read as regions [num_blocks, H_kv, C] (one block of one KV head) plus
two index maps [bs, d] giving the element of token t, dim d inside a region:

  * FACTORKV_CPU_THIN, FACTORKV_LATENT (ours): [num_blocks, H_kv, bs, r + D], K = [..., :r]
    (thin key or latent slot), V = [..., r:]
  * vLLM CPU_ATTN: [num_blocks, H_kv, bs, 2D], whose kernel stores each block's keys
    dim-major ([D, bs] for fp32 "vec") and values token-major. The maps are found by
    writing a probe through vLLM's own ``cpu_attn_reshape_and_cache``, so they follow
    whatever layout the installed kernel uses; an unknown layout fails loudly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.eviction.policy import EvictionConfigError, EvictionPolicy

SUPPORTED_BACKENDS = ("CPU_ATTN", "FACTORKV_CPU_THIN", "FACTORKV_LATENT")


@dataclass
class LayerCache:
    """One layer's paged cache as flat regions, with per-token element maps. ``latent``:
    the layer caches latent keys; a function [H_kv, n, r] latent slots -> [H_kv, n, D] pre-RoPE
    keys, and the layer selects per layer (every head of a latent reads every kept token)."""

    name: str
    flat: torch.Tensor        # the layer's cache, flattened (a view)
    region: int               # elements per (block, KV head)
    num_kv_heads: int
    key_map: torch.Tensor     # [bs, dk] int64: element of (token, dim) in a region
    value_map: torch.Tensor   # [bs, dv]
    latent: Callable[[torch.Tensor], torch.Tensor] | None = None

    def index(self, block_ids: torch.Tensor, n: int, which: torch.Tensor) -> torch.Tensor:
        """Flat indices [H, n, d] of tokens 0..n-1 of a request with these blocks."""
        bs = which.shape[0]
        j = torch.arange(n)
        base = (block_ids[j // bs][None, :] * self.num_kv_heads
                + torch.arange(self.num_kv_heads)[:, None]) * self.region     # [H, n]
        return base[..., None] + which[j % bs][None]                          # [H, n, d]


def _thin_maps(block_size: int, r: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.arange(block_size)[:, None] * (r + d)
    return t + torch.arange(r), t + r + torch.arange(d)


@functools.lru_cache(maxsize=8)
def _cpu_attn_maps(block_size: int, head_size: int, isa: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Probe vLLM's CPU_ATTN cache writer (fp32): element of (token, dim) in a [bs, 2D] region."""
    from vllm import _custom_ops as ops

    size = block_size * head_size
    maps = []
    for which in (0, 1):
        cache = torch.full((1, 1, block_size, 2 * head_size), -1.0)
        k_cache, v_cache = cache.view(1, 1, 2 * block_size, head_size).chunk(2, dim=2)
        ids = torch.arange(size, dtype=torch.float32).view(block_size, 1, head_size)
        key, value = (ids, torch.zeros_like(ids)) if which == 0 else (torch.zeros_like(ids), ids)
        ops.cpu_attn_reshape_and_cache(key, value, k_cache, v_cache, torch.arange(block_size),
                                       isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        half = cache.view(-1)[which * size:(which + 1) * size].long()
        if not torch.equal(half.sort().values, torch.arange(size)):
            raise EvictionConfigError(f"kv-evict: unrecognised CPU_ATTN cache layout (isa {isa})")
        where = torch.empty(size, dtype=torch.long)
        where[half] = torch.arange(size) + which * size
        maps.append(where.view(block_size, head_size))
    return maps[0], maps[1]


def layer_cache(name: str, backend_name: str, kv_cache: torch.Tensor, head_size: int,
                block_size: int, isa: str | None = None,
                latent: Callable[[torch.Tensor], torch.Tensor] | None = None) -> LayerCache:
    """The region view and element maps of one layer's paged cache (no copy); ``latent``:
    the key rebuild of a FACTORKV_LATENT layer (see LayerCache)."""
    if not kv_cache.is_contiguous():
        raise EvictionConfigError(f"kv-evict: layer {name}: KV cache is not contiguous")
    nb, h = kv_cache.shape[0], kv_cache.shape[1]
    region = kv_cache.numel() // (nb * h)
    if backend_name == "CPU_ATTN":
        if kv_cache.dtype != torch.float32:
            raise EvictionConfigError("kv-evict: CPU_ATTN eviction is validated for float32 only")
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        isa = isa or _get_attn_isa(kv_cache.dtype, block_size, head_size)
        key_map, value_map = _cpu_attn_maps(block_size, head_size, isa)
    elif backend_name in ("FACTORKV_CPU_THIN", "FACTORKV_LATENT"):
        key_map, value_map = _thin_maps(block_size, head_size, kv_cache.shape[-1] - head_size)
    else:
        raise EvictionConfigError(
            f"kv-evict: attention backend {backend_name} is not supported "
            f"(supported: {', '.join(SUPPORTED_BACKENDS)})")
    if region != block_size * (key_map.shape[1] + value_map.shape[1]):
        raise EvictionConfigError(f"kv-evict: layer {name}: cache shape {tuple(kv_cache.shape)} "
                                  f"does not match block size {block_size}")
    if (backend_name == "FACTORKV_LATENT") != (latent is not None):
        raise EvictionConfigError(f"kv-evict: layer {name}: latent keys need their key rebuild")
    return LayerCache(name, kv_cache.view(-1), region, h, key_map, value_map, latent)


@torch.no_grad()
def compact(cache: LayerCache, block_ids: list[int], n: int, policy: EvictionPolicy
            ) -> torch.Tensor:
    """Keep policy.select(...) of the n cached tokens per head (latent layers: one selection
    for all heads, ``policy.select_per_layer`` of the rebuilt pre-RoPE keys), packed into
    slots 0..k-1, k = policy.num_kept(n).

    Returns the kept positions [H, k] (slot j of head h now holds token sel[h, j])."""
    k = policy.num_kept(n)
    if k == n:
        return torch.arange(n).expand(cache.num_kv_heads, n)
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    k_src = cache.index(ids, n, cache.key_map)
    v_src = cache.index(ids, n, cache.value_map)
    keys = cache.flat[k_src]                                   # [H, n, dk]
    if cache.latent is not None:
        sel = policy.select_per_layer(cache.latent(keys)).expand(cache.num_kv_heads, -1)
    else:
        sel = policy.select(policy.score(keys))                # [H, k]
    kept_k = keys.gather(1, sel[..., None].expand(-1, -1, keys.shape[-1]))
    kept_v = cache.flat[v_src.gather(1, sel[..., None].expand(-1, -1, v_src.shape[-1]))]
    cache.flat[k_src[:, :k]] = kept_k
    cache.flat[v_src[:, :k]] = kept_v
    return sel
