"""CPU attention backend for thin keys: K has r dims, V has D dims (vLLM's CPU_ATTN needs r = D).

Cache layout (same packing as vLLM's GPU DIFFKV backends), per layer:
    kv_cache [num_blocks, H_kv, block_size, r + D]   K = [..., :r], V = [..., r:]

Per step the metadata builder turns the block table into flat row indices once,
shared by all layers; each layer then gathers its rows with one index_select:
  * decode requests (query length 1, placed first by vLLM's batch reordering) are
    batched: scores [n, H_kv, G, L] = q kᵀ over a padded length L, masked, softmaxed;
  * other requests (prefill, chunked prefill, prefix-cache hits) run one SDPA each,
    with a mask that lets query i (absolute position ctx + i) see keys 0..ctx + i.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from vllm.config import VllmConfig
from vllm.v1.attention.backend import (AttentionBackend, AttentionImpl, AttentionLayer,
                                       AttentionMetadataBuilder, AttentionType,
                                       CommonAttentionMetadata, MultipleOf)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from engine.attention.cpu_kernels import decode_kernels

BACKEND_NAME = "FACTORKV_CPU_THIN"
# Upper bound on the decode gather buffer (bytes); larger batches are processed in chunks.
DECODE_GATHER_BYTES = 256 << 20


class ThinKeyCPUBackend(AttentionBackend):
    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type["ThinKeyCPUImpl"]:
        return ThinKeyCPUImpl

    @staticmethod
    def get_builder_cls() -> type["ThinKeyCPUMetadataBuilder"]:
        return ThinKeyCPUMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (KVCacheLayout.LBHNC,)

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER


@dataclass
class PrefillRequest:
    """One non-decode request: its query rows, cache rows [H_kv, S] and mask [Q, S] (None = causal)."""
    q_start: int
    q_end: int
    rows: torch.Tensor
    mask: torch.Tensor | None


@dataclass
class ThinKeyCPUMetadata:
    num_actual_tokens: int
    num_decodes: int
    decode_rows: torch.Tensor | None          # [n, H_kv, L] flat cache rows
    decode_bias: torch.Tensor | None          # [n, 1, 1, L] 0 / -inf
    decode_block_table: torch.Tensor | None   # [n, blocks] int32 (for the C++ kernel)
    decode_seq_lens: torch.Tensor | None      # [n] int32
    prefills: list[PrefillRequest] = field(default_factory=list)
    # kept for tools that read vLLM-style metadata
    seq_lens: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    slot_mapping: torch.Tensor | None = None


def cache_rows(block_table_row: torch.Tensor, length: int, num_kv_heads: int,
               block_size: int) -> torch.Tensor:
    """Flat row indices [H_kv, length] into kv_cache.view(-1, r + D) for tokens 0..length-1."""
    t = torch.arange(length)
    blk = block_table_row[t // block_size].long()
    heads = torch.arange(num_kv_heads)
    return (blk[None, :] * num_kv_heads + heads[:, None]) * block_size + (t % block_size)[None, :]


class ThinKeyCPUMetadataBuilder(AttentionMetadataBuilder[ThinKeyCPUMetadata]):
    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str],
                 vllm_config: VllmConfig, device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size
        self.num_kv_heads = kv_cache_spec.num_kv_heads
        self._init_reorder_batch_threshold(1)
        self.use_kernel = (vllm_config.model_config.dtype == torch.float32
                           and decode_kernels() is not None)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> ThinKeyCPUMetadata:
        m = common_attn_metadata
        n = m.num_reqs
        qsl = m.query_start_loc_cpu[: n + 1].tolist()
        seq_lens = m.seq_lens[:n].cpu()
        seq_list = seq_lens.tolist()
        block_table = m.block_table_tensor[:n].cpu()
        bs, h_kv = self.block_size, self.num_kv_heads

        nd = 0
        while nd < n and qsl[nd + 1] - qsl[nd] == 1:
            nd += 1
        decode_rows = decode_bias = decode_bt = decode_sl = None
        if nd and self.use_kernel:
            length = max(seq_list[:nd])
            decode_bt = block_table[:nd, : (length + bs - 1) // bs].to(torch.int32).contiguous()
            decode_sl = seq_lens[:nd].to(torch.int32).contiguous()
        elif nd:
            length = max(seq_list[:nd])
            t = torch.arange(length)
            blk = block_table[:nd, : (length + bs - 1) // bs].long()[:, t // bs]     # [nd, L]
            heads = torch.arange(h_kv)
            decode_rows = ((blk[:, None, :] * h_kv + heads[None, :, None]) * bs
                           + (t % bs)[None, None, :])
            valid = t[None, :] < seq_lens[:nd, None]
            decode_bias = torch.zeros(nd, 1, 1, length).masked_fill_(~valid[:, None, None, :],
                                                                     float("-inf"))
        prefills = []
        for i in range(nd, n):
            q_len, s = qsl[i + 1] - qsl[i], seq_list[i]
            if q_len == 0:
                continue
            ctx = s - q_len
            mask = None
            if ctx:
                mask = torch.arange(s)[None, :] <= (ctx + torch.arange(q_len))[:, None]
            prefills.append(PrefillRequest(qsl[i], qsl[i + 1],
                                           cache_rows(block_table[i], s, h_kv, bs), mask))
        return ThinKeyCPUMetadata(num_actual_tokens=m.num_actual_tokens, num_decodes=nd,
                                  decode_rows=decode_rows, decode_bias=decode_bias,
                                  decode_block_table=decode_bt, decode_seq_lens=decode_sl,
                                  prefills=prefills, seq_lens=seq_lens, block_table=block_table,
                                  slot_mapping=m.slot_mapping)


class ThinKeyCPUImpl(AttentionImpl[ThinKeyCPUMetadata]):
    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int,
                 alibi_slopes: list[float] | None, sliding_window: int | None,
                 kv_cache_dtype: str, logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **kwargs) -> None:
        if alibi_slopes is not None or sliding_window is not None or logits_soft_cap:
            raise NotImplementedError(
                f"{BACKEND_NAME} supports plain causal attention only (no ALiBi, sliding "
                "window or logit soft-cap)")
        if kv_cache_dtype != "auto":
            raise NotImplementedError(f"{BACKEND_NAME} stores the KV cache in the model dtype; "
                                      f"kv_cache_dtype={kv_cache_dtype!r} is not supported")
        self.num_heads = num_heads
        self.head_size = head_size            # r, the thin key dim
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.sliding_window = None
        decode_kernels()      # build/load the C++ kernel at model load, not on first request

    def do_kv_cache_update(self, layer: AttentionLayer, key: torch.Tensor, value: torch.Tensor,
                           kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """kv_cache[slot // bs, :, slot % bs] = [key | value] for every real token."""
        n = slot_mapping.shape[0]
        key, value = key[:n], value[:n]
        if n and bool((slot_mapping < 0).any()):
            keep = slot_mapping >= 0
            slot_mapping, key, value = slot_mapping[keep], key[keep], value[keep]
        nb, h_kv, bs, c = kv_cache.shape
        slot = slot_mapping.long()
        if not kv_cache.is_contiguous():
            r = self.head_size
            kv_cache[slot // bs, :, slot % bs, :r] = key.to(kv_cache.dtype)
            kv_cache[slot // bs, :, slot % bs, r:] = value.to(kv_cache.dtype)
            return
        # flat row of (token, head) in kv_cache.view(-1, r + D): (blk * H_kv + h) * bs + off
        rows = ((slot // bs * h_kv)[:, None] + torch.arange(h_kv)) * bs + (slot % bs)[:, None]
        packed = torch.cat((key, value.to(key.dtype)), dim=-1).to(kv_cache.dtype)
        kv_cache.view(nb * h_kv * bs, c).index_copy_(0, rows.reshape(-1), packed.reshape(-1, c))

    def forward(self, layer: AttentionLayer, query: torch.Tensor, key: torch.Tensor,
                value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: ThinKeyCPUMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        """query [T, H, r] -> output [T, H, D], reading K/V from the paged cache."""
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError(f"{BACKEND_NAME} has no fused output quantization")
        if attn_metadata is None:      # profiling / warm-up run
            return output.fill_(0)
        r = self.head_size
        flat = kv_cache.view(-1, kv_cache.shape[-1])          # [num_blocks*H_kv*bs, r + D]
        nd = attn_metadata.num_decodes
        if nd:
            self._decode(query[:nd], kv_cache, attn_metadata, output[:nd])
        pad = flat.shape[1] - 2 * r                               # D - r
        for p in attn_metadata.prefills:
            g = flat.index_select(0, p.rows.reshape(-1)).view(self.num_kv_heads, -1, flat.shape[1])
            q, k = query[p.q_start:p.q_end].transpose(0, 1), g[..., :r]   # [H, Q, r], [H_kv, S, r]
            if pad > 0:
                # Zero-padding q and k to D leaves every score q·k unchanged, and lets torch
                # pick its fused (flash) CPU kernel, which needs equal q/k/v head sizes
                # and 4-D inputs; otherwise it materialises the [H, Q, S] scores
                # (~6x slower at 2k tokens, docs/engine.md).
                q, k = F.pad(q, (0, pad)), F.pad(k, (0, pad))
            out = F.scaled_dot_product_attention(
                q[None], k[None], g[None, ..., r:], attn_mask=p.mask, is_causal=p.mask is None,
                scale=self.scale, enable_gqa=self.group > 1)[0]     # [H, Q, D]
            output[p.q_start:p.q_end] = out.transpose(0, 1)
        return output

    def _decode(self, query: torch.Tensor, kv_cache: torch.Tensor, md: ThinKeyCPUMetadata,
                output: torch.Tensor) -> None:
        if md.decode_block_table is not None:
            kernel = decode_kernels()
            dst = output if output.is_contiguous() else torch.empty_like(output)
            kernel.thin_decode(query.contiguous(), kv_cache, md.decode_block_table,
                               md.decode_seq_lens, dst, self.scale)
            if dst is not output:
                output.copy_(dst)
            return
        flat = kv_cache.view(-1, kv_cache.shape[-1])
        nd, r, c = query.shape[0], self.head_size, flat.shape[1]
        rows, bias = md.decode_rows, md.decode_bias
        length = rows.shape[-1]
        per_req = self.num_kv_heads * length * c * flat.element_size()
        step = max(1, DECODE_GATHER_BYTES // max(per_req, 1))
        for s in range(0, nd, step):
            e = min(nd, s + step)
            g = flat.index_select(0, rows[s:e].reshape(-1)).view(e - s, self.num_kv_heads,
                                                                  length, c)
            q = query[s:e].view(e - s, self.num_kv_heads, self.group, r)
            scores = torch.matmul(q, g[..., :r].transpose(-1, -2)).float()   # [n, H_kv, G, L]
            scores.mul_(self.scale).add_(bias[s:e])
            probs = torch.softmax(scores, dim=-1).to(g.dtype)
            out = torch.matmul(probs, g[..., r:])                               # [n, H_kv, G, D]
            output[s:e] = out.view(e - s, self.num_heads, -1)
