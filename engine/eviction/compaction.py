"""Compact one request's paged KV cache in place: keep the selected tokens, packed from slot 0.

For every attention layer and KV head h, with the request's blocks B and n cached tokens
(token j lives in block B[j // bs], offset j % bs):

    sel_h   = policy.select(‖K_h[0:n]‖₂)            (engine/eviction/policy.py)
    K_h[j] <- K_h[sel_h[j]],  V_h[j] <- V_h[sel_h[j]]    for j < n_kept

All heads keep the same count, so afterwards the request's cache holds n_kept tokens in
its first ceil(n_kept / bs) blocks and the rest can be returned to vLLM's block pool.
Slot order does not matter to attention (RoPE was applied before the keys were cached).

Cache layouts understood (per layer, from the layer's attention backend):
  * vLLM CPU_ATTN:           [num_blocks, H_kv, 2 * bs, D] view: K rows [:bs], V rows [bs:]
  * FACTORKV_CPU_THIN (ours): [num_blocks, H_kv, bs, r + D]: K = [..., :r], V = [..., r:]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.eviction.policy import EvictionConfigError, EvictionPolicy

SUPPORTED_BACKENDS = ("CPU_ATTN", "FACTORKV_CPU_THIN")


@dataclass
class LayerCache:
    """Views [num_blocks, H_kv, block_size, d] of one layer's keys and values."""

    name: str
    keys: torch.Tensor
    values: torch.Tensor


def layer_cache(name: str, backend_name: str, kv_cache: torch.Tensor, head_size: int,
                block_size: int) -> LayerCache:
    """Key and value views of one layer's paged cache (no copy)."""
    if backend_name == "CPU_ATTN":
        v = kv_cache.view(kv_cache.shape[0], kv_cache.shape[1], block_size * 2, -1)
        return LayerCache(name, v[:, :, :block_size], v[:, :, block_size:])
    if backend_name == "FACTORKV_CPU_THIN":
        return LayerCache(name, kv_cache[..., :head_size], kv_cache[..., head_size:])
    raise EvictionConfigError(
        f"kv-evict: attention backend {backend_name} is not supported "
        f"(supported: {', '.join(SUPPORTED_BACKENDS)})")


def _slots(block_ids: torch.Tensor, n: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    j = torch.arange(n)
    return block_ids[j // block_size], j % block_size


@torch.no_grad()
def compact(cache: LayerCache, block_ids: list[int], n: int, policy: EvictionPolicy,
            block_size: int) -> int:
    """Keep policy.select(...) of the n cached tokens per head, packed into slots 0..k-1.

    Returns k = policy.num_kept(n)."""
    k = policy.num_kept(n)
    if k == n:
        return n
    ids = torch.as_tensor(block_ids, dtype=torch.long)
    blk, off = _slots(ids, n, block_size)
    heads = torch.arange(cache.keys.shape[1])
    keys = cache.keys[blk[None, :], heads[:, None], off[None, :]]      # [H, n, dk]
    values = cache.values[blk[None, :], heads[:, None], off[None, :]]  # [H, n, dv]
    sel = policy.select(keys.float().norm(dim=-1))                      # [H, k]
    kept_k = keys.gather(1, sel[..., None].expand(-1, -1, keys.shape[-1]))
    kept_v = values.gather(1, sel[..., None].expand(-1, -1, values.shape[-1]))
    blk, off = _slots(ids, k, block_size)
    cache.keys[blk[None, :], heads[:, None], off[None, :]] = kept_k
    cache.values[blk[None, :], heads[:, None], off[None, :]] = kept_v
    return k
