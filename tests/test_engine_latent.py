"""vLLM latent-key models (key_mode "latent") against the plain-torch model (tiny random GQA
RoPE configs): prefill, chunked prefill, prefix-cache hits, mixed batches, two block sizes,
joint and per-head latents; KV capacity equals thin keys of the same rank."""

from __future__ import annotations

import pytest
import torch

from engine.checkpoint import FactoredKeysConfig, model_dims
from engine.rotary import source_inv_freq
from engine.torch_model import TorchCausalLM
from engine.weights import load_checkpoint
from model_patches.conversion.checkpoint_writer import write_factored, write_rotary_pair_subset
from model_patches.conversion.latent_init import init_latent_state
from tests.engine_utils import max_logprob_error, run_vllm, tiny_llama

pytestmark = pytest.mark.slow

LOGPROB_TOL = 2e-4


def write_latent(src, dst, rank: int, groups: int, seed: int = 0):
    """A latent checkpoint of src: weight PCA (identity input moments) with B perturbed, so
    no structure of the exact PCA can hide a reconstruction bug."""
    cfg, sd = load_checkpoint(src)
    n_layers, _, h_kv, _, hidden = model_dims(cfg)
    state = init_latent_state(cfg, sd, rank, groups, [torch.eye(hidden)] * n_layers, False)
    g = torch.Generator().manual_seed(seed)
    for k in [k for k in state if k.endswith("k_up_proj.weight")]:
        state[k] = state[k] + 0.2 * torch.randn(state[k].shape, generator=g)
    inv, scaling = source_inv_freq(cfg)
    fk = FactoredKeysConfig.build(cfg, rank, [inv[None].expand(h_kv, -1)] * n_layers,
                                  method="latent-test", source_model="tiny",
                                  rotary_attention_scaling=scaling, key_mode="latent",
                                  latent_groups=groups)
    return write_factored(src, dst, cfg=cfg, family="llama", state=state, fk=fk)


@pytest.fixture(scope="module")
def latent_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    src = tiny_llama(root / "src", heads=4, kv_heads=2)                  # D = 32
    return {"src": src, "joint": write_latent(src, root / "joint", 8, 1),
            "per_head": write_latent(src, root / "per_head", 8, 2, seed=1)}


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 37, 150, 90)]


@pytest.mark.parametrize("name, block_size", [("joint", 16), ("joint", 5), ("per_head", 16)])
def test_vllm_latent_matches_reference(latent_models, tmp_path, name, block_size):
    path = latent_models[name]
    prompts = _prompts(7)
    shared = prompts[2][:64] + _prompts(8)[1]          # shares 64 tokens with prompt 2
    round1 = [{"prompt": p, "max_tokens": n, "prompt_logprobs": 5 if i == 2 else None}
              for i, (p, n) in enumerate(zip(prompts, (8, 12, 6, 10)))]
    round2 = [{"prompt": prompts[2], "max_tokens": 6}, {"prompt": shared, "max_tokens": 8}]
    out = run_vllm(path, [round1, round2], tmp_path, block_size=block_size,
                   kv_cache_memory_bytes=32 << 20, enable_prefix_caching=True,
                   max_num_batched_tokens=64, max_num_seqs=8)
    ref = TorchCausalLM.from_dir(path)
    for rnd, outs in zip([round1, round2], out["rounds"]):
        for req, got in zip(rnd, outs):
            prompt = req["prompt"]
            logits = ref(torch.tensor(prompt + got["tokens"]))
            expect = logits[len(prompt) - 1:-1].argmax(-1).tolist()
            assert got["tokens"] == expect, f"greedy tokens differ for a {len(prompt)}-token prompt"
            err = max_logprob_error(logits, got["logprobs"], len(prompt) - 1)
            assert err < LOGPROB_TOL, f"decode logprobs off by {err}"
            if req.get("prompt_logprobs"):
                err = max_logprob_error(logits, got["prompt_logprobs"], -1)
                assert err < LOGPROB_TOL, f"prompt logprobs off by {err}"
    assert out["rounds"][1][0]["num_cached_tokens"] >= block_size * ((150 - 1) // block_size)
    assert out["rounds"][1][1]["num_cached_tokens"] >= 64 // block_size * block_size


def test_latent_capacity_equals_thin_keys_of_the_same_rank(latent_models, tmp_path):
    thin = write_rotary_pair_subset(latent_models["src"], tmp_path / "thin", 8)
    budget = dict(kv_cache_memory_bytes=64 << 20, block_size=128)
    t = run_vllm(thin, [], tmp_path, **budget)
    lat = run_vllm(latent_models["joint"], [], tmp_path, **budget)
    assert lat["num_gpu_blocks"] == t["num_gpu_blocks"]
    assert lat["kv_cache_tokens"] == t["kv_cache_tokens"]


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
