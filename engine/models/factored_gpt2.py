"""GPT-2 family (learned positions, MHA, no RoPE) with factored keys, for vLLM.

Without RoPE absorbing the key factor into the query is exact algebra:
q·k = (Aᵀ W_q x)·(B x). The fused c_attn of GPT-2 is stored split as
q_proj [H·r], k_proj [H·r], v_proj [H·D] (Linear layout); everything else is GPT-2's.
"""

from __future__ import annotations

from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import CacheConfig, VllmConfig
from vllm.distributed import get_tensor_model_parallel_world_size
from vllm.distributed.parallel_state import get_pp_group
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import LayerNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.quantization import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import (ParallelLMHead,
                                                                 VocabParallelEmbedding)
from vllm.model_executor.models.gpt2 import GPT2LMHeadModel, GPT2MLP
from vllm.model_executor.models.utils import (AutoWeightsLoader, WeightsMapper,
                                              extract_layer_index, make_layers,
                                              make_empty_intermediate_tensors_factory,
                                              maybe_prefix)
from vllm.sequence import IntermediateTensors

from engine.attention.selector import thin_key_backend
from engine.models.thin_attention import factored_keys


class FactoredGPT2Attention(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        fk = factored_keys(config)
        layer = extract_layer_index(prefix)
        tp = get_tensor_model_parallel_world_size()
        total_heads = config.num_attention_heads
        self.num_heads = total_heads // tp
        self.rank, self.head_dim = fk.ranks[layer], fk.head_dim
        self.qk_size = self.num_heads * self.rank
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.rank, total_heads, bias=True, quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj", v_head_size=self.head_dim)
        self.c_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size,
                                        bias=True, quant_config=quant_config,
                                        prefix=f"{prefix}.c_proj")
        self.attn = Attention(self.num_heads, self.rank, fk.softmax_scale,
                              cache_config=cache_config, quant_config=quant_config,
                              prefix=f"{prefix}.attn", attn_backend=thin_key_backend(self.head_dim),
                              head_size_v=self.head_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.qk_size, self.qk_size, qkv.shape[-1] - 2 * self.qk_size], dim=-1)
        out, _ = self.c_proj(self.attn(q, k, v))
        return out


class FactoredGPT2Block(nn.Module):
    def __init__(self, config, cache_config: CacheConfig | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "") -> None:
        super().__init__()
        inner = config.n_inner if config.n_inner is not None else 4 * config.hidden_size
        self.ln_1 = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.attn = FactoredGPT2Attention(config, cache_config, quant_config, prefix=f"{prefix}.attn")
        self.ln_2 = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(inner, config, quant_config, prefix=f"{prefix}.mlp")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


@support_torch_compile(dynamic_arg_dims={"input_ids": 0, "position_ids": 0,
                                         "intermediate_tensors": 0, "inputs_embeds": 0})
class FactoredGPT2Model(nn.Module):
    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_substr={".attn.bias": None, ".attn.masked_bias": None},
        orig_to_new_stacked={".q_proj": (".qkv_proj", "q"), ".k_proj": (".qkv_proj", "k"),
                             ".v_proj": (".qkv_proj", "v")},
    )

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        cache_config, quant_config = vllm_config.cache_config, vllm_config.quant_config
        self.config = config
        self.wte = VocabParallelEmbedding(config.vocab_size, config.hidden_size,
                                          quant_config=quant_config, prefix=f"{prefix}.wte")
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.start_layer, self.end_layer, self.h = make_layers(
            config.num_hidden_layers,
            lambda prefix: FactoredGPT2Block(config, cache_config, quant_config, prefix=prefix),
            prefix=f"{prefix}.h")
        self.ln_f = LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states"], config.n_embd)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids: torch.Tensor | None, position_ids: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None,
                inputs_embeds: torch.Tensor | None) -> torch.Tensor | IntermediateTensors:
        if get_pp_group().is_first_rank:
            if inputs_embeds is None:
                inputs_embeds = self.embed_input_ids(input_ids)
            hidden_states = inputs_embeds + self.wpe(position_ids)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
        for layer in islice(self.h, self.start_layer, self.end_layer):
            hidden_states = layer(hidden_states)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states})
        return self.ln_f(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def conv1d_to_linear(ws):
            # GPT-2's Conv1D stores [in, out]; the split q/k/v_proj are already [out, in].
            for name, w in ws:
                if name.endswith(".weight") and (".c_proj." in name or ".c_fc." in name):
                    w = w.t()
                yield name, w
        return AutoWeightsLoader(self).load_weights(conv1d_to_linear(weights),
                                                    mapper=self.hf_to_vllm_mapper)


class FactoredGPT2LMHeadModel(GPT2LMHeadModel):
    """GPT2LMHeadModel with FactoredGPT2Model as its transformer (weights load the same way)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        nn.Module.__init__(self)
        config = vllm_config.model_config.hf_config
        factored_keys(config)   # fail fast, one line, on a bad block
        self.config, self.quant_config = config, vllm_config.quant_config
        self.transformer = FactoredGPT2Model(vllm_config=vllm_config,
                                             prefix=maybe_prefix(prefix, "transformer"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                      quant_config=self.quant_config, prefix=f"{prefix}.lm_head")
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.transformer.wte)
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.transformer.make_empty_intermediate_tensors
