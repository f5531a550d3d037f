"""Attention backend for RoPE-exact latent keys (key_mode "latent", docs/checkpoint-format.md).

The paged cache is the thin-key layout (engine/attention/cpu_backend.py), per layer
    kv_cache [num_blocks, H_kv, block_size, r + D]     latent slot h = [..., :r], V = [..., r:]
where the layer's pre-RoPE latent (H_kv·r dims) is stored r dims per KV-head slot. Attention
reads a sequence's S cached tokens and, per KV head h (group g = h // (H_kv/G)),

    k_h(t) = RoPE_t(B_h · c_g(t))     (engine.torch_model.LatentKeys.reconstruct, then the
                                       layer's full-width rotary table at the key's position t)
    o_j   = softmax(scale · q_j · k_h(t)) v_h(t)      (query head j reads KV head j // (H/H_kv))

Cost per cached token per step: D·r_g multiply-adds per KV head to reconstruct, on top of the
(H/H_kv)·2·D of QK + PV; written down next to the measurements in docs/results/engine.md.

  * prefill / chunked prefill / prefix-cache hits: one batched matmul reconstructs the keys
    of all S tokens, RoPE rotates them at positions 0..S-1, then one SDPA per request;
  * decode reads the blocks in place: on CPU (float32) the C++ kernel latent_decode
    (csrc/paged_decode.cpp: per block, rebuild + rotate each key, scores, online softmax),
    on CUDA the Triton kernel (engine/attention/triton_latent.py); without a kernel the
    torch path (gather [n, H_kv, L, r], reconstruct, rotate, scores, softmax, values).
A token's position is its index in the sequence's cache, unless L2-norm eviction compacted
the cache (engine/eviction: one selection per layer, then ``key_positions``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from engine.attention.cpu_backend import (DECODE_GATHER_BYTES, ThinKeyCPUBackend,
                                          ThinKeyCPUImpl, ThinKeyCPUMetadata,
                                          ThinKeyCPUMetadataBuilder)
from engine.attention.cpu_kernels import decode_kernels
from engine.torch_model import LatentKeys

BACKEND_NAME = "FACTORKV_LATENT"
NO_POSITIONS = torch.empty(0, dtype=torch.int32)     # the C++ kernel's "key position = slot"


def _use_triton(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


class LatentKeyMetadataBuilder(ThinKeyCPUMetadataBuilder):
    """The thin-key metadata; decode reads the block table with a kernel (CPU: the C++
    latent_decode, float32; CUDA: the Triton kernel) or falls back to gathered rows."""

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if torch.device(device).type != "cpu":
            self.use_kernel = _use_triton(torch.device(device))


class LatentKeyBackend(ThinKeyCPUBackend):
    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["LatentKeyImpl"]:
        return LatentKeyImpl

    @staticmethod
    def get_builder_cls() -> type["LatentKeyMetadataBuilder"]:
        return LatentKeyMetadataBuilder


class LatentKeyImpl(ThinKeyCPUImpl):
    """head_size = r (the latent slot), values D; the model binds its keys with :meth:`bind`.

    ``key_positions``: None (slot t holds the token at position t), or int32 [R, >= L] set by
    the eviction worker for the step (engine/eviction/worker.py): decode request i's slot t
    holds the token at position key_positions[i, t]. Compacted requests only decode."""

    key_positions: torch.Tensor | None = None

    def bind(self, keys: LatentKeys, up: torch.nn.Module) -> None:
        """keys: the layer's latent parametrisation (local KV heads, rotary table); up: the
        module whose ``weight`` [H_kv·D, r_g] reconstructs keys (read at each step: loaded
        after the model is built)."""
        self.keys, self.up = keys, up
        self._tables = None

    def rebuild_keys(self, slots: torch.Tensor) -> torch.Tensor:
        """Latent slots [..., H_kv, r] -> pre-RoPE keys [..., H_kv, D]."""
        lead = slots.shape[:-2]
        k = self.keys.reconstruct(slots.reshape(*lead, -1), self.up.weight.to(slots.dtype))
        return k.view(*lead, self.num_kv_heads, -1)

    def _keys(self, latent: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Cached latent [*P, H_kv, r] of the tokens at positions pos [*P] -> rotated keys
        [*P, H_kv, D] (the layer's rotary table, one row per token)."""
        k = self.rebuild_keys(latent)
        flat = k.reshape(pos.numel(), -1)                              # [tokens, H_kv·D]
        return self.keys.rope.rotate_keys(pos.reshape(-1), flat).view(k.shape)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: ThinKeyCPUMetadata | None,
                output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, H, D] (rotated) -> output [T, H, D], keys reconstructed from the cache."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} has no fused output quantization")
        if attn_metadata is None:      # profiling / warm-up run
            return output.fill_(0)
        r = self.head_size
        flat = kv_cache.view(-1, kv_cache.shape[-1])          # [num_blocks*H_kv*bs, r + D]
        nd = attn_metadata.num_decodes
        if nd:
            self._decode(query[:nd], kv_cache, attn_metadata, output[:nd])
        for p in attn_metadata.prefills:
            g = flat.index_select(0, p.rows.reshape(-1).to(flat.device))
            g = g.view(self.num_kv_heads, -1, flat.shape[1]).transpose(0, 1)   # [S, H_kv, r + D]
            pos = torch.arange(g.shape[0], device=g.device)
            k = self._keys(g[..., :r], pos).transpose(0, 1)                   # [H_kv, S, D]
            mask = None if p.mask is None else p.mask.to(query.device)
            out = F.scaled_dot_product_attention(
                query[p.q_start:p.q_end].transpose(0, 1)[None], k[None],
                g[..., r:].transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                scale=self.scale, enable_gqa=self.group > 1)[0]               # [H, Q, D]
            output[p.q_start:p.q_end] = out.transpose(0, 1)
        return output

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, md: ThinKeyCPUMetadata,
                output: torch.Tensor) -> None:
        d = self.keys.head_dim
        nd = query.shape[0]
        pos = None if self.key_positions is None else self.key_positions[:nd]
        if md.decode_block_table is not None and query.device.type == "cuda":   # Triton
            from engine.attention.triton_latent import latent_decode
            cos, sin = self._rope_tables(kv_cache.device)
            up = self.up.weight.view(self.num_kv_heads, d, -1)
            latent_decode(query, kv_cache, md.decode_block_table.to(query.device),
                          md.decode_seq_lens.to(query.device), up, cos, sin, self.scale,
                          self.keys.groups, out=output,
                          key_pos=None if pos is None else pos.to(query.device))
            return
        if md.decode_block_table is not None:                 # CPU: the C++ kernel
            up_t = self.up.weight.view(self.num_kv_heads, d, -1).transpose(1, 2).contiguous()
            top = int(md.decode_seq_lens.max()) if pos is None else int(pos.max()) + 1
            cos, sin = self.keys.rope.tables(top)
            dst = output if output.is_contiguous() else torch.empty_like(output)
            decode_kernels().latent_decode(
                query.contiguous(), kv_cache, md.decode_block_table, md.decode_seq_lens,
                up_t.float(), cos, sin, NO_POSITIONS if pos is None else pos.contiguous(),
                self.keys.groups, dst, self.scale)
            if dst is not output:
                output.copy_(dst)
            return
        flat = kv_cache.view(-1, kv_cache.shape[-1])
        r, c = self.head_size, flat.shape[1]
        rows, bias = md.decode_rows, md.decode_bias
        length = rows.shape[-1]
        per_req = self.num_kv_heads * length * (c + self.keys.head_dim) * flat.element_size()
        step = max(1, DECODE_GATHER_BYTES // max(per_req, 1))
        for s in range(0, nd, step):
            e = min(nd, s + step)
            g = flat.index_select(0, rows[s:e].reshape(-1)).view(e - s, self.num_kv_heads,
                                                                  length, c)
            at = (torch.arange(length, device=g.device)[:, None].expand(length, e - s)
                  if pos is None else pos[s:e, :length].T)                # [L, n] positions
            k = self._keys(g[..., :r].permute(2, 0, 1, 3), at)             # [L, n, H_kv, D]
            q = query[s:e].view(e - s, self.num_kv_heads, self.group, -1)
            scores = torch.matmul(q, k.permute(1, 2, 3, 0)).float()          # [n, H_kv, G, L]
            scores.mul_(self.scale).add_(bias[s:e])
            probs = torch.softmax(scores, dim=-1).to(g.dtype)
            out = torch.matmul(probs, g[..., r:])                               # [n, H_kv, G, D]
            output[s:e] = out.view(e - s, self.num_heads, -1)

    def _rope_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [max_pos, D] of the layer's table (one table for all KV heads)."""
        if self._tables is None:
            rope = self.keys.rope
            freq = rope.inv_freq
            if not bool((freq == freq[:1]).all()):
                raise NotImplementedError("the Triton latent kernel needs one rotary table for "
                                          "all KV heads of a layer")
            n = rope.cos_table.shape[0] if rope.cos_table is not None else 1 << 15
            cos, sin = rope.cos_sin(torch.arange(n, device=freq.device))
            self._tables = (cos[:, 0].to(device).contiguous(), sin[:, 0].to(device).contiguous())
        return self._tables
