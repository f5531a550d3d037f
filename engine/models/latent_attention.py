"""Llama-family self-attention with RoPE-exact latent keys (key_mode "latent"), for vLLM.

    q = RoPE(W_q x)  [H, D]      c = A x  [H_kv·r] (k_proj; cached r per KV-head slot)
    v = W_v x        [H_kv, D]   k_h = RoPE(B_h c_g) at the key's position (in the backend)

The paged cache holds H_kv·(r + D) elements per token, exactly as thin keys of rank r, so
vLLM's spec, block counts and capacity arithmetic are unchanged. Tensor parallelism: a rank
holds whole latent groups (checked here) and the rows of B of its KV heads.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import (_encode_layer_name,
                                                            unified_attention_with_output,
                                                            unified_kv_cache_update)
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.models.utils import extract_layer_index
from vllm.model_executor.utils import set_weight_attrs
from vllm.v1.attention.backend import AttentionType

from engine.attention.latent_backend import LatentKeyBackend
from engine.checkpoint import latent_groups_fit
from engine.models.thin_attention import (factored_keys, local_inv_freq, local_kv_heads,
                                          max_model_len)
from engine.rotary import ThinRotaryEmbedding
from engine.torch_model import LatentKeys


class LatentAttention(Attention):
    """vLLM's Attention with queries of D dims per head while the cached key slot has r:
    its own views ([T, H, D] queries, [T, H_kv, r] latent, [T, H_kv, D] values), then the
    same cache-update and attention ops as Attention.forward (direct calls where vLLM makes
    them, its registered custom ops otherwise, e.g. on CUDA under torch.compile)."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                output_shape=None, output_dtype=None) -> torch.Tensor:
        t, d = query.shape[0], self.head_size_v
        output = torch.empty(t, self.num_heads * d, dtype=output_dtype or query.dtype,
                             device=query.device)
        q = query.reshape(t, self.num_heads, d)
        k = key.view(t, self.num_kv_heads, self.head_size)
        v = value.view(t, self.num_kv_heads, d)
        out = output.view(t, self.num_heads, d)
        if self.use_direct_call:
            dep = unified_kv_cache_update(k, v, self.layer_name)
            unified_attention_with_output(q, k, v, out, self.layer_name, kv_cache_dummy_dep=dep)
        else:
            name = _encode_layer_name(self.layer_name)
            dep = torch.ops.vllm.unified_kv_cache_update(k, v, name)
            torch.ops.vllm.unified_attention_with_output(q, k, v, out, name,
                                                         kv_cache_dummy_dep=dep)
        return output


class KeyUpProjection(nn.Module):
    """B: reconstructs this rank's KV heads' keys from their group's latent, weight
    [H_kv_local·D, r_g] (the checkpoint's k_up_proj rows of those heads)."""

    def __init__(self, kv_heads: list[int], head_dim: int, latent_dims: int) -> None:
        super().__init__()
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.weight = nn.Parameter(torch.empty(len(kv_heads) * head_dim, latent_dims),
                                   requires_grad=False)
        set_weight_attrs(self.weight, {"weight_loader": self.weight_loader})

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        d = self.head_dim
        rows = torch.cat([torch.arange(h * d, (h + 1) * d) for h in self.kv_heads])
        param.data.copy_(loaded[rows].to(param.dtype))


class LatentLlamaAttention(nn.Module):
    """Self-attention with latent keys (same constructor signature as LlamaAttention)."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config=None, bias: bool = False,
                 bias_o_proj: bool = False, cache_config=None, prefix: str = "",
                 attn_type: str = AttentionType.DECODER) -> None:
        super().__init__()
        if attn_type != AttentionType.DECODER:
            raise ValueError("factored-key models are decoder-only")
        fk = factored_keys(config)
        layer = extract_layer_index(prefix)
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        per_group = num_kv_heads // fk.latent_groups
        if num_heads % tp_size or not latent_groups_fit(num_kv_heads, fk.latent_groups, tp_size):
            raise ValueError(
                f"latent keys with {num_kv_heads} KV heads in {fk.latent_groups} latent group(s) "
                f"do not split over TP size {tp_size}: each rank must hold whole groups (convert "
                f"with --latent-groups a multiple of {tp_size})")
        self.num_heads = num_heads // tp_size
        kv_heads = local_kv_heads(num_kv_heads, tp_size, tp_rank)
        self.num_kv_heads = len(kv_heads)
        self.rank, self.head_dim = fk.ranks[layer], fk.head_dim
        d, r = self.head_dim, self.rank
        if (self.num_heads * d) % r:
            raise ValueError(f"latent keys: key rank {r} must divide the query width per "
                             f"rank ({self.num_heads * d}) for the fused q/latent/v projection")
        self.q_size, self.k_size, self.v_size = self.num_heads * d, self.num_kv_heads * r, \
            self.num_kv_heads * d
        if getattr(config, "model_type", "") == "qwen2":   # Qwen2: q/k/v biases, no o_proj bias
            bias, bias_o_proj = True, False
        # q is H·D wide: as (H·D/r) "heads" of r it splits over TP exactly like H heads of D.
        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size, head_size=r, total_num_heads=num_heads * d // r,
            total_num_kv_heads=num_kv_heads, bias=bias, quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj", v_head_size=d)
        self.k_up_proj = KeyUpProjection(kv_heads, d, fk.latent_dims(layer))
        self.o_proj = RowParallelLinear(
            input_size=num_heads * d, output_size=hidden_size, bias=bias_o_proj,
            quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = ThinRotaryEmbedding(local_inv_freq(fk, layer, kv_heads), self.num_heads,
                                              fk.rotary_attention_scaling,
                                              max_position=max_model_len())
        self.attn = LatentAttention(
            self.num_heads, r, fk.softmax_scale, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
            attn_backend=LatentKeyBackend, head_size_v=d)
        self.attn.impl.bind(LatentKeys(r, d, self.num_kv_heads,
                                       self.num_kv_heads // per_group, self.rotary_emb),
                            self.k_up_proj)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, c, v = qkv.split([self.q_size, self.k_size, self.v_size], dim=-1)
        q = self.rotary_emb.rotate_queries(positions, q)
        out, _ = self.o_proj(self.attn(q, c, v))
        return out
