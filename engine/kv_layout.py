"""KV-cache memory arithmetic: the one code path behind the /metrics gauges,
GET /v1/kv-cache, `factorkv capacity`, the serve-time budget check, the converter's
summary and the quality report's bytes column.

Per token, a decoder layer l with H_kv KV heads caches keys of k_l dims and values of
D dims per head, so the whole model caches

    bytes/token = sum_l H_kv · (k_l + D) · dtype_bytes

where k_l = D for an ordinary model and k_l = r_l (the thin key rank) for a factored
checkpoint. The unfactored *baseline* of the same model caches L · H_kv · 2D · dtype_bytes.
vLLM pages the cache in blocks of ``block_size`` tokens and cuts a byte budget into
``budget // (block_size · bytes/token)`` blocks; a request of C tokens holds
ceil(C / block_size) blocks, so a pool of N blocks holds N / ceil(C / block_size) such
requests (fractional, like vLLM's "Maximum concurrency for C tokens per request").
The same memory holds proportionally more blocks of a model with fewer bytes/token:
that ratio is the concurrency gain over the baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from engine.checkpoint import BLOCK, FactoredKeysConfig, model_dims

#: Bytes per element of every dtype spelling the code meets: vLLM's ``--kv-cache-dtype``
#: and ``--dtype`` names, and torch dtypes (``torch.float16`` is read as ``float16``).
KV_DTYPE_BYTES = {
    "float32": 4, "fp32": 4, "float": 4,
    "float16": 2, "fp16": 2, "half": 2, "bfloat16": 2, "bf16": 2,
    "fp8": 1, "fp8_e4m3": 1, "fp8_e5m2": 1, "fp8_inc": 1, "int8": 1,
}


def find_dtype_bytes(dtype: Any) -> int | None:
    """Element size of a dtype name (``fp16``, ``torch.float32``) or torch dtype; None if unknown
    (e.g. vLLM's ``auto``)."""
    return KV_DTYPE_BYTES.get(str(dtype).removeprefix("torch.").lower())


def dtype_bytes(dtype: Any) -> int:
    """Element size of a dtype, as :func:`find_dtype_bytes`; ValueError if unknown."""
    nbytes = find_dtype_bytes(dtype)
    if nbytes is None:
        raise ValueError(f"unknown KV cache dtype {dtype!r} (choose from fp32, fp16, bf16, fp8)")
    return nbytes


@dataclass(frozen=True)
class KVLayout:
    """What one token costs in the KV cache of a model (all layers)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int                 # D: value dims per head (= the original key dims)
    key_dims: tuple[int, ...]     # k_l per layer: D (ordinary) or the thin rank r_l
    element_bytes: int            # bytes per cached element (KV cache dtype)
    factored: bool

    @classmethod
    def unfactored(cls, num_layers: int, num_kv_heads: int, head_dim: int,
                   element_bytes: int) -> KVLayout:
        """An ordinary model: k_l = D in every layer."""
        return cls(num_layers, num_kv_heads, head_dim, (head_dim,) * num_layers, element_bytes, False)

    @classmethod
    def of_factored(cls, fk: FactoredKeysConfig, kv_dtype: Any) -> KVLayout:
        """A factored checkpoint's block: k_l = r_l."""
        return cls(len(fk.ranks), fk.num_kv_heads, fk.head_dim, tuple(fk.ranks),
                   dtype_bytes(kv_dtype), True)

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
        """Fraction of the key cache removed: 1 − sum_l k_l / (L · D) (0.75 at r = D/4)."""
        return 1.0 - sum(self.key_dims) / (self.num_layers * self.head_dim)

    def with_key_rank(self, rank: int) -> KVLayout:
        """The same model factored to a uniform key rank (what-if for `factorkv capacity`)."""
        if not 1 <= rank <= self.head_dim:
            raise ValueError(f"key rank {rank} is outside 1..head_dim ({self.head_dim})")
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim,
                        (rank,) * self.num_layers, self.element_bytes, True)


def kv_layout(hf_config: Any, kv_dtype: Any) -> KVLayout:
    """The KV layout of an HF config (dict or object), factored (FactorKV block, validated by
    :class:`FactoredKeysConfig`) or not."""
    layers, _, kv_heads, head_dim, _ = model_dims(hf_config)
    has_block = (hf_config.get(BLOCK) if isinstance(hf_config, dict)
                 else getattr(hf_config, BLOCK, None)) is not None
    if has_block:
        return KVLayout.of_factored(FactoredKeysConfig.from_hf_config(hf_config), kv_dtype)
    return KVLayout.unfactored(layers, kv_heads, head_dim, dtype_bytes(kv_dtype))


def blocks_in_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """Blocks vLLM cuts from a byte budget: budget // (block_size · bytes/token)."""
    return int(budget_bytes) // (block_size * bytes_per_token)


def blocks_per_request(context_tokens: int, block_size: int) -> int:
    """Blocks one request of C tokens holds: ceil(C / block_size), at least 1."""
    return max(1, math.ceil(context_tokens / block_size))


def users_at_context(num_blocks: int, block_size: int, context_tokens: int) -> float:
    """How many requests of ``context_tokens`` tokens a pool of ``num_blocks`` holds at once:
    num_blocks / ceil(C / block_size)."""
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
        """block_size · bytes/token."""
        return self.layout.bytes_per_token * self.block_size

    @property
    def memory_bytes(self) -> int:
        """Bytes the pool occupies: num_blocks × block bytes."""
        return self.num_blocks * self.block_bytes

    @property
    def capacity_tokens(self) -> int:
        """num_blocks · block_size."""
        return self.num_blocks * self.block_size

    @property
    def baseline_num_blocks(self) -> int:
        """Blocks the unfactored model gets from the same budget (or, when the budget is
        not known, from the memory this pool occupies)."""
        memory = self.budget_bytes if self.budget_bytes is not None else self.memory_bytes
        return blocks_in_budget(memory, self.block_size, self.layout.baseline_bytes_per_token)

    @property
    def baseline_capacity_tokens(self) -> int:
        return self.baseline_num_blocks * self.block_size

    def bytes_per_user(self, context_tokens: int) -> int:
        """KV bytes one request of ``context_tokens`` holds (whole blocks)."""
        return blocks_per_request(context_tokens, self.block_size) * self.block_bytes

    def baseline_bytes_per_user(self, context_tokens: int) -> int:
        """The same request in the unfactored model (whole blocks)."""
        return (blocks_per_request(context_tokens, self.block_size) * self.block_size
                * self.layout.baseline_bytes_per_token)

    def users(self, context_tokens: int) -> float:
        return users_at_context(self.num_blocks, self.block_size, context_tokens)

    def baseline_users(self, context_tokens: int) -> float:
        return users_at_context(self.baseline_num_blocks, self.block_size, context_tokens)

    def concurrency_gain(self, context_tokens: int) -> float:
        """users / baseline users at the same context (inf when the baseline fits none)."""
        base = self.baseline_users(context_tokens)
        return self.users(context_tokens) / base if base else math.inf

    @classmethod
    def from_memory(cls, layout: KVLayout, memory_bytes: int, block_size: int) -> KVCapacity:
        """Fill ``memory_bytes`` with blocks, as vLLM does (budget // bytes per block)."""
        return cls(layout, block_size,
                   blocks_in_budget(memory_bytes, block_size, layout.bytes_per_token),
                   int(memory_bytes))


def weight_bytes_estimate(hf_config: Any, element_bytes: int) -> int:
    """Parameter memory of a Llama-style decoder from its shapes (for users-per-device).

    embeddings (+ untied LM head) + per layer: q,o (H·D×d), k,v (H_kv·D×d), MLP 3·d·d_ff.
    """
    def get(name, default=None):
        return hf_config.get(name, default) if isinstance(hf_config, dict) else getattr(hf_config, name, default)

    layers, heads, kv_heads, head_dim, hidden = model_dims(hf_config)
    vocab = int(get("vocab_size", 0) or 0)
    ffn = int(get("intermediate_size", None) or get("n_inner", None) or 4 * hidden)
    per_layer = 2 * heads * head_dim * hidden + 2 * kv_heads * head_dim * hidden + 3 * hidden * ffn
    embed = vocab * hidden * (1 if get("tie_word_embeddings", False) else 2)
    return (layers * per_layer + embed) * element_bytes
