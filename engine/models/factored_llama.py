"""Llama family (Llama, Mistral, Qwen2-style, SmolLM2) with factored keys, for vLLM.

Thin keys (below); latent keys (key_mode "latent") use engine/models/latent_attention.py.

Identical to vLLM's LlamaForCausalLM except the attention module: q_proj is H×r,
k_proj is H_kv×r, v_proj H_kv×D, RoPE runs over the r thin dims with the
checkpoint's frequency table, and the Attention layer is built with
head_size=r, head_size_v=D, so vLLM's FullAttentionSpec pages hold
H_kv·(r + D) elements per token instead of H_kv·2D.
"""

from __future__ import annotations

import torch
from torch import nn

from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType

from engine.attention.selector import thin_key_backend
from engine.models.latent_attention import LatentLlamaAttention
from engine.models.thin_attention import (factored_keys, local_inv_freq, local_kv_heads,
                                          max_model_len)
from engine.rotary import ThinRotaryEmbedding


class FactoredLlamaAttention(nn.Module):
    """Self-attention with r-dim queries/keys and D-dim values (same signature as LlamaAttention)."""

    def __init__(self, config, hidden_size: int, num_heads: int, num_kv_heads: int,
                 max_position_embeddings: int = 8192, quant_config: QuantizationConfig | None = None,
                 bias: bool = False, bias_o_proj: bool = False,
                 cache_config: CacheConfig | None = None, prefix: str = "",
                 attn_type: str = AttentionType.DECODER) -> None:
        super().__init__()
        if attn_type != AttentionType.DECODER:
            raise ValueError("factored-key models are decoder-only")
        fk = factored_keys(config)
        layer = extract_layer_index(prefix)
        tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        if num_heads % tp_size:
            raise ValueError(f"{num_heads} attention heads do not split over TP size {tp_size}")
        self.num_heads = num_heads // tp_size
        kv_heads = local_kv_heads(num_kv_heads, tp_size, tp_rank)
        self.num_kv_heads = len(kv_heads)
        self.rank, self.head_dim = fk.ranks[layer], fk.head_dim
        self.q_size = self.num_heads * self.rank
        self.k_size = self.num_kv_heads * self.rank
        self.v_size = self.num_kv_heads * self.head_dim
        if getattr(config, "model_type", "") == "qwen2":   # Qwen2: q/k/v biases, no o_proj bias
            bias, bias_o_proj = True, False

        self.qkv_proj = QKVParallelLinear(
            hidden_size=hidden_size, head_size=self.rank, total_num_heads=num_heads,
            total_num_kv_heads=num_kv_heads, bias=bias, quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj", v_head_size=self.head_dim)
        self.o_proj = RowParallelLinear(
            input_size=num_heads * self.head_dim, output_size=hidden_size, bias=bias_o_proj,
            quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = ThinRotaryEmbedding(local_inv_freq(fk, layer, kv_heads), self.num_heads,
                                              fk.rotary_attention_scaling,
                                              max_position=max_model_len())
        self.attn = Attention(
            self.num_heads, self.rank, fk.softmax_scale, num_kv_heads=self.num_kv_heads,
            cache_config=cache_config, quant_config=quant_config, prefix=f"{prefix}.attn",
            attn_backend=thin_key_backend(self.head_dim), head_size_v=self.head_dim)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.k_size, self.v_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class FactoredLlamaDecoderLayer(LlamaDecoderLayer):
    """LlamaDecoderLayer with thin-key or latent-key attention (the checkpoint's key_mode)."""

    def __init__(self, vllm_config: VllmConfig, prefix: str = "", config=None,
                 attn_layer_type: type[nn.Module] = FactoredLlamaAttention) -> None:
        latent = factored_keys(config or vllm_config.model_config.hf_config).latent
        super().__init__(vllm_config, prefix=prefix, config=config,
                         attn_layer_type=LatentLlamaAttention if latent else FactoredLlamaAttention)


class FactoredLlamaForCausalLM(LlamaForCausalLM):
    """LlamaForCausalLM whose decoder layers use FactoredLlamaAttention."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "",
                 layer_type: type[nn.Module] = FactoredLlamaDecoderLayer) -> None:
        factored_keys(vllm_config.model_config.hf_config)   # fail fast, one line, on a bad block
        super().__init__(vllm_config=vllm_config, prefix=prefix,
                         layer_type=FactoredLlamaDecoderLayer)
