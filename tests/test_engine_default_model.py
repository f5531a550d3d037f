"""The default model through the factored engine: a full-rank factored copy is exact."""

from __future__ import annotations

import pytest

from model_patches.conversion.checkpoint_writer import write_full_rank
from tests.engine_utils import run_vllm

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Photosynthesis is the process by which plants",
]


def test_full_rank_factored_default_model_matches_original(default_model_dir, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    factored = write_full_rank(default_model_dir, tmp_path / "full-rank")
    batch = [{"prompt": tok(p)["input_ids"], "max_tokens": 32, "logprobs": 1} for p in PROMPTS]
    engine = dict(kv_cache_memory_bytes=256 << 20, max_model_len=512)
    original = run_vllm(default_model_dir, [batch], tmp_path, **engine)
    thin = run_vllm(factored, [batch], tmp_path, **engine)
    for a, b in zip(original["rounds"][0], thin["rounds"][0]):
        assert a["tokens"] == b["tokens"]
        worst = max(abs(x[k] - y[k]) for x, y in zip(a["logprobs"], b["logprobs"]) for k in x if k in y)
        assert worst < 1e-3, f"sampled-token logprobs differ by {worst}"
    # r = D: the factored cache has exactly the original's page size, so the same capacity
    assert thin["num_gpu_blocks"] == original["num_gpu_blocks"]
