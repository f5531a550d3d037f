"""KV-cache memory arithmetic shared by the /metrics gauges, GET /v1/kv-cache and
`factorkv capacity` (one code path, so the calculator and the live server agree).

Per token, a decoder layer l with H_kv KV heads caches keys of k_l dims and values of
D dims per head, so the whole model caches

    bytes/token = sum_l H_kv · (k_l + D) · dtype_bytes

where k_l = D for an ordinary model and k_l = r_l (the thin key rank) for a factored
checkpoint. The unfactored *baseline* of the same model caches L · H_kv · 2D · dtype_bytes.
vLLM pages the cache in blocks of ``block_size`` tokens; a request of C tokens holds
ceil(C / block_size) blocks, so a pool of N blocks holds N / ceil(C / block_size) such
requests (fractional, like vLLM's "Maximum concurrency for C tokens per request").
The same memory holds proportionally more blocks of a model with fewer bytes/token:
that ratio is the concurrency gain over the baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

#: Bytes per element of the KV cache dtypes vLLM accepts (``--kv-cache-dtype``).
KV_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "int8": 1,
}


def dtype_bytes(dtype: Any) -> int:
    """Element size of a dtype given as a name (``fp16``, ``torch.float32``) or a torch dtype."""
    name = str(dtype).removeprefix("torch.").lower()
    if name not in KV_DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype {dtype!r} (choose from fp32, fp16, bf16, fp8)")
    return KV_DTYPE_BYTES[name]


@dataclass(frozen=True)
class KVLayout:
    """What one token costs in the KV cache of a model (all layers)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int                 # D: value dims per head (= the original key dims)
    key_dims: tuple[int, ...]     # k_l per layer: D (ordinary) or the thin rank r_l
    element_bytes: int            # bytes per cached element (KV cache dtype)
    factored: bool

    @property
    def bytes_per_token(self) -> int:
        """sum_l H_kv (k_l + D) · bytes."""
        return sum(self.num_kv_heads * (k + self.head_dim) for k in self.key_dims) * self.element_bytes

    @property
    def baseline_bytes_per_token(self) -> int:
        """The unfactored model: L · H_kv · 2D · bytes."""
        return self.num_layers * self.num_kv_heads * 2 * self.head_dim * self.element_bytes

    @property
    def key_cache_cut(self) -> float:
        """Fraction of the key cache removed (0.75 at r = D/4)."""
        return 1.0 - sum(self.key_dims) / (self.num_layers * self.head_dim)

    def with_key_rank(self, rank: int) -> KVLayout:
        """The same model factored to a uniform key rank (what-if for `factorkv capacity`)."""
        if not 1 <= rank <= self.head_dim:
            raise ValueError(f"key rank {rank} is outside 1..head_dim ({self.head_dim})")
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim,
                        (rank,) * self.num_layers, self.element_bytes, True)


def kv_layout(hf_config: Any, kv_dtype: Any) -> KVLayout:
    """The KV layout of an HF config (dict or object), factored (FactorKV block) or not."""
    from engine.checkpoint import BLOCK, FactoredKeysConfig, model_dims

    layers, _, kv_heads, head_dim, _ = model_dims(hf_config)
    has_block = (hf_config.get(BLOCK) if isinstance(hf_config, dict)
                 else getattr(hf_config, BLOCK, None)) is not None
    if has_block:
        fk = FactoredKeysConfig.from_hf_config(hf_config)
        keys = tuple(fk.ranks)
    else:
        keys = (head_dim,) * layers
    return KVLayout(layers, kv_heads, head_dim, keys, dtype_bytes(kv_dtype), has_block)


def blocks_per_request(context_tokens: int, block_size: int) -> int:
    return max(1, math.ceil(context_tokens / block_size))


def users_at_context(num_blocks: int, block_size: int, context_tokens: int) -> float:
    """How many requests of ``context_tokens`` tokens a pool of ``num_blocks`` holds at once."""
    return num_blocks / blocks_per_request(context_tokens, block_size)


@dataclass(frozen=True)
class KVCapacity:
    """A KV memory budget filled with one model, compared with its unfactored baseline."""

    layout: KVLayout
    block_size: int
    num_blocks: int               # blocks of this model (the engine's own count when live)
    budget_bytes: int | None = None  # the KV budget the pool was cut from, when known


    @property
    def block_bytes(self) -> int:
        return self.layout.bytes_per_token * self.block_size

    @property
    def memory_bytes(self) -> int:
        """Bytes the pool occupies: num_blocks × block bytes."""
        return self.num_blocks * self.block_bytes

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def baseline_num_blocks(self) -> int:
        """Blocks the unfactored model gets from the same budget (or, when the budget is
        not known, from the memory this pool occupies)."""
        memory = self.budget_bytes if self.budget_bytes is not None else self.memory_bytes
        return memory // (self.layout.baseline_bytes_per_token * self.block_size)

    @property
    def baseline_capacity_tokens(self) -> int:
        return self.baseline_num_blocks * self.block_size

    def bytes_per_user(self, context_tokens: int) -> int:
        """KV bytes one request of ``context_tokens`` holds (whole blocks)."""
        return blocks_per_request(context_tokens, self.block_size) * self.block_bytes

    def baseline_bytes_per_user(self, context_tokens: int) -> int:
        return (blocks_per_request(context_tokens, self.block_size) * self.block_size
                * self.layout.baseline_bytes_per_token)

    def users(self, context_tokens: int) -> float:
        return users_at_context(self.num_blocks, self.block_size, context_tokens)

    def baseline_users(self, context_tokens: int) -> float:
        return users_at_context(self.baseline_num_blocks, self.block_size, context_tokens)

    def concurrency_gain(self, context_tokens: int) -> float:
        base = self.baseline_users(context_tokens)
        return self.users(context_tokens) / base if base else math.inf

    @classmethod
    def from_memory(cls, layout: KVLayout, memory_bytes: int, block_size: int) -> KVCapacity:
        """Fill ``memory_bytes`` with blocks, as vLLM does (budget // bytes per block)."""
        return cls(layout, block_size, int(memory_bytes) // (layout.bytes_per_token * block_size),
                   int(memory_bytes))


def weight_bytes_estimate(hf_config: Any, element_bytes: int) -> int:
    """Parameter memory of a Llama-style decoder from its shapes (for users-per-device).

    embeddings (+ untied LM head) + per layer: q,o (H·D×d), k,v (H_kv·D×d), MLP 3·d·d_ff.
    """
    from engine.checkpoint import model_dims

    def get(name, default=None):
        return hf_config.get(name, default) if isinstance(hf_config, dict) else getattr(hf_config, name, default)

    layers, heads, kv_heads, head_dim, hidden = model_dims(hf_config)
    vocab = int(get("vocab_size", 0) or 0)
    ffn = int(get("intermediate_size", None) or get("n_inner", None) or 4 * hidden)
    per_layer = 2 * heads * head_dim * hidden + 2 * kv_heads * head_dim * hidden + 3 * hidden * ffn
    embed = vocab * hidden * (1 if get("tie_word_embeddings", False) else 2)
    return (layers * per_layer + embed) * element_bytes
