"""vLLM factored-key models against the plain-torch reference (tiny random configs).

Covers GQA and MHA, with RoPE (Llama family) and without (GPT-2 family), two block sizes,
chunked prefill, batched requests of different lengths, and prefix-cache hits; plus the
KV capacity gain read from the running engine.
"""

from __future__ import annotations

import random

import pytest

from model_patches.conversion.checkpoint_writer import write_rotary_pair_subset
from tests.engine_utils import check_vllm_against_reference, run_vllm, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.slow

# fp32 end to end; differences come only from summation order.
LOGPROB_TOL = 2e-4


def _random_pairs(seed: int, head_dim: int, rank: int):
    """A different random subset of rotary pairs for every (layer, KV head)."""
    def pairs(layer: int, kv_head: int) -> list[int]:
        rng = random.Random(seed * 1000 + layer * 10 + kv_head)
        return sorted(rng.sample(range(head_dim // 2), rank // 2))
    return pairs


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    src = tiny_llama(root / "llama_gqa", heads=4, kv_heads=2)
    out["llama_gqa"] = write_rotary_pair_subset(src, root / "llama_gqa_r8", 8,
                                                pairs=_random_pairs(1, 32, 8))
    src = tiny_llama(root / "llama_mha", heads=4, kv_heads=4, seed=1)
    out["llama_mha"] = write_rotary_pair_subset(src, root / "llama_mha_r16", 16,
                                                pairs=_random_pairs(2, 32, 16))
    src = tiny_gpt2(root / "gpt2", heads=4)
    out["gpt2_mha"] = write_rotary_pair_subset(src, root / "gpt2_r8", 8)
    out["_sources"] = root
    return out


@pytest.mark.parametrize("name, block_size, kernel", [
    (name, bs, "cpp") for name in ("llama_gqa", "llama_mha", "gpt2_mha") for bs in (16, 128)
] + [("llama_gqa", 16, "torch")])
def test_vllm_matches_reference(tiny_models, tmp_path, name, block_size, kernel):
    """kernel: the C++ decode kernel or the pure-torch fallback (FACTORKV_CPU_KERNEL=0)."""
    check_vllm_against_reference(tiny_models[name], tmp_path, block_size, LOGPROB_TOL,
                                 env={"FACTORKV_CPU_KERNEL": "0" if kernel == "torch" else "1"})


def test_kv_capacity_gain_read_from_engine(tmp_path):
    """Same KV budget: the engine holds 2D/(r+D) x the baseline's tokens (r = D/4 -> 1.6x)."""
    src = tiny_llama(tmp_path / "src", heads=4, kv_heads=2)     # D = 32
    thin = write_rotary_pair_subset(src, tmp_path / "thin", 8)
    budget = dict(kv_cache_memory_bytes=64 << 20, block_size=128)
    base = run_vllm(src, [], tmp_path, **budget)
    fact = run_vllm(thin, [], tmp_path, **budget)
    expected = base["num_gpu_blocks"] * (2 * 32) / (8 + 32)
    assert abs(fact["num_gpu_blocks"] - expected) <= 1, (base, fact)
    assert fact["kv_cache_tokens"] / base["kv_cache_tokens"] == pytest.approx(1.6, abs=0.01)
