"""vLLM latent-key models (key_mode "latent") against the plain-torch model (tiny random GQA
RoPE configs): prefill, chunked prefill, prefix-cache hits, mixed batches, two block sizes,
joint and per-head latents; KV capacity equals thin keys of the same rank."""

from __future__ import annotations

import pytest

from model_patches.conversion.checkpoint_writer import write_rotary_pair_subset
from tests.engine_utils import check_vllm_against_reference, run_vllm, tiny_llama, write_latent

pytestmark = pytest.mark.slow

LOGPROB_TOL = 2e-4


@pytest.fixture(scope="module")
def latent_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    src = tiny_llama(root / "src", heads=4, kv_heads=2)                  # D = 32
    return {"src": src, "joint": write_latent(src, root / "joint", 8, 1),
            "per_head": write_latent(src, root / "per_head", 8, 2, seed=1),
            # a latent of 16 dims in layer 0 and 8 in layer 1 (per-layer widths)
            "per_layer": write_latent(src, root / "per_layer", [8, 4], 1, seed=2)}


@pytest.mark.parametrize("name, block_size, kernel", [
    ("joint", 16, "cpp"), ("joint", 5, "cpp"), ("per_head", 16, "cpp"), ("joint", 16, "torch"),
    ("per_layer", 16, "cpp"), ("per_layer", 5, "torch")])
def test_vllm_latent_matches_reference(latent_models, tmp_path, name, block_size, kernel):
    """kernel: the C++ latent decode kernel or the pure-torch fallback (FACTORKV_CPU_KERNEL=0)."""
    check_vllm_against_reference(latent_models[name], tmp_path, block_size, LOGPROB_TOL,
                                 env={"FACTORKV_CPU_KERNEL": "0" if kernel == "torch" else "1"})


def test_latent_capacity_equals_thin_keys_of_the_same_rank(latent_models, tmp_path):
    thin = write_rotary_pair_subset(latent_models["src"], tmp_path / "thin", 8)
    budget = dict(kv_cache_memory_bytes=64 << 20, block_size=128)
    t = run_vllm(thin, [], tmp_path, **budget)
    lat = run_vllm(latent_models["joint"], [], tmp_path, **budget)
    assert lat["num_gpu_blocks"] == t["num_gpu_blocks"]
    assert lat["kv_cache_tokens"] == t["kv_cache_tokens"]


def test_per_layer_latent_widths_page_by_the_kv_layout_formula(latent_models, tmp_path):
    """Layers of different latent widths share one block table; vLLM cuts the budget by the
    summed bytes per token, exactly engine.kv_layout's formula."""
    import json

    from engine.kv_layout import blocks_in_budget, kv_layout
    path = latent_models["per_layer"]
    budget = dict(kv_cache_memory_bytes=64 << 20, block_size=128)
    layout = kv_layout(json.loads((path / "config.json").read_text()), "float32")
    assert layout.key_dims == (8, 4)
    got = run_vllm(path, [], tmp_path, **budget)
    assert got["num_gpu_blocks"] == blocks_in_budget(64 << 20, 128, layout.bytes_per_token)
    assert got["num_gpu_blocks"] > run_vllm(latent_models["joint"], [], tmp_path,
                                            **budget)["num_gpu_blocks"]


def test_full_rank_latent_default_model_matches_the_original_through_vllm(default_model_dir,
                                                                          tmp_path):
    """SmolLM2 converted to latent keys at r = D (PCA basis, exact up to rounding), served by
    FactorKV's latent engine, against the original served by stock vLLM: same greedy tokens,
    logprobs within float32 rounding."""
    from transformers import AutoTokenizer

    from model_patches.conversion.convert import convert

    lat = convert(default_model_dir, tmp_path / "latent-full", key_rank=64, stat_tokens=2 * 512,
                  progress=False).dst
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    texts = ["The capital of France is", "def fibonacci(n):\n    ",
             "In 1905, Albert Einstein published four papers that"]
    rounds = [[{"prompt": tok(t)["input_ids"], "max_tokens": 12} for t in texts]]
    engine = dict(kv_cache_memory_bytes=64 << 20, block_size=32)    # CPU_ATTN: multiples of 32
    orig = run_vllm(default_model_dir, rounds, tmp_path, **engine)["rounds"][0]
    got = run_vllm(lat, rounds, tmp_path, **engine)["rounds"][0]
    for o, g in zip(orig, got):
        assert g["tokens"] == o["tokens"]
        for t, so, sg in zip(o["tokens"], o["logprobs"], g["logprobs"]):
            assert abs(so[str(t)] - sg[str(t)]) < 1e-3
