"""L2-norm KV eviction in the vLLM engine (tiny random models) against the plain-torch reference.

One engine per model (vLLM's own CPU_ATTN for an unmodified Llama; our thin-key backend for
a factored one; our latent-key backend, C++ kernel and torch decode path, for latent keys,
where the reference selects per layer), chunked prefill and prefix caching on, server policy
keep=0.5:

* round 0, one request: outputs equal the reference that applies the same selection; the
  blocks past the kept tokens are back in the scheduler's free pool right after prefill;
* round 1, one batch: default keep, a per-request keep=0.25, a keep=1.0 request (no
  eviction, equal to the reference without eviction), a prompt shorter than sink+window;
* round 2: the evicted prompt again without eviction gets no prefix-cache hit (its blocks
  were rewritten in place and never cached); an evicting request never reads the cache.

Plus: keep=1.0 gives the same logprobs as stock vLLM; bad settings are one-line errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.eviction.policy import L2NormPolicy as EvictionPolicy
from engine.torch_model import TorchCausalLM
from model_patches.conversion.checkpoint_writer import write_full_rank, write_rotary_pair_subset
from tests.engine_utils import max_logprob_error, run_vllm, tiny_llama, write_latent

pytestmark = pytest.mark.slow

LOGPROB_TOL = 2e-4
BLOCK = 32
SINK, WINDOW = 4, 16
VOCAB = 1024


def evict_engine(keep: float = 0.5) -> dict:
    return dict(scheduler_cls="engine.eviction.scheduler.EvictionScheduler",
                worker_cls="engine.eviction.worker.EvictingCPUWorker",
                additional_config={"factorkv_kv_evict": {"keep": keep, "sink": SINK,
                                                         "window": WINDOW}})


ENGINE = dict(block_size=BLOCK, kv_cache_memory_bytes=16 << 20, enable_prefix_caching=True,
              max_num_batched_tokens=64, max_num_seqs=8)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evict")
    src = tiny_llama(root / "llama", heads=4, kv_heads=2, vocab=VOCAB)
    return {
        # served unmodified (vLLM's CPU_ATTN); reference: the exact full-rank factoring
        "llama": (src, write_full_rank(src, root / "llama_full")),
        # served and referenced as a factored r=8 checkpoint (FACTORKV_CPU_THIN)
        "llama_r8": (write_rotary_pair_subset(src, root / "llama_r8", 8),) * 2,
        # latent keys (FACTORKV_LATENT): per-layer selection, keys rotated at kept positions
        "llama_latent": (write_latent(src, root / "llama_latent", 8, 1),) * 2,
    }


def _prompt(n: int, seed: int) -> list[int]:
    """n distinct token ids. In layer 0 a key's norm depends on the token only (RoPE is a
    rotation), so a repeated token ties with itself and engine and reference could break
    the tie differently; distinct tokens keep the selection unique."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randperm(VOCAB - 3, generator=g)[:n] + 3).tolist()


def _check(ref: TorchCausalLM, prompt: list[int], got: dict, keep: float) -> None:
    ids = torch.tensor(prompt + got["tokens"])
    policy = EvictionPolicy(keep=keep, sink=SINK, window=WINDOW)
    logits = ref.forward(ids, evict=(policy, len(prompt))) if policy.enabled else ref(ids)
    expect = logits[len(prompt) - 1:-1].argmax(-1).tolist()
    assert got["tokens"] == expect, f"greedy tokens differ (keep={keep}, {len(prompt)} tokens)"
    err = max_logprob_error(logits, got["logprobs"], len(prompt) - 1)
    assert err < LOGPROB_TOL, f"logprobs off by {err} (keep={keep})"


@pytest.mark.parametrize("name, kernel", [("llama", "cpp"), ("llama_r8", "cpp"),
                                          ("llama_latent", "cpp"), ("llama_latent", "torch")])
def test_eviction_matches_reference_and_frees_blocks(models, tmp_path, name, kernel):
    """kernel: the latent backend's C++ decode kernel or its torch path (FACTORKV_CPU_KERNEL=0)."""
    served, reference = models[name]
    long_p, mid_p, keep1_p, short_p = _prompt(300, 1), _prompt(150, 2), _prompt(200, 3), _prompt(15, 4)
    rounds = [
        [{"prompt": long_p, "max_tokens": 8}],
        [{"prompt": _prompt(260, 5), "max_tokens": 8},
         {"prompt": mid_p, "max_tokens": 10, "extra_args": {"kv_evict_keep": 0.25}},
         {"prompt": keep1_p, "max_tokens": 8, "extra_args": {"kv_evict_keep": 1.0}},
         {"prompt": short_p, "max_tokens": 6}],
        [{"prompt": long_p, "max_tokens": 6, "extra_args": {"kv_evict_keep": 1.0}},
         {"prompt": keep1_p, "max_tokens": 6}],
    ]
    keeps = [[0.5], [0.5, 0.25, 1.0, 0.5], [1.0, 0.5]]
    out = run_vllm(served, rounds, tmp_path, trace=True, **ENGINE, **evict_engine(0.5),
                   env={"FACTORKV_CPU_KERNEL": "0" if kernel == "torch" else "1"})
    ref = TorchCausalLM.from_dir(reference)
    for rnd, outs, ks in zip(rounds, out["rounds"], keeps):
        for req, got, keep in zip(rnd, outs, ks):
            _check(ref, req["prompt"], got, keep)

    # round 0: 300 tokens in 64-token chunks; after the last chunk 150 tokens are kept, and
    # the blocks past ceil(150 / 32) = 5 are free again at once (10 -> 5 blocks held)
    idle = out["traces"][0][-1]["free_blocks"]   # all free again (vLLM keeps a null block)
    used = [idle - s["free_blocks"] for s in out["traces"][0]]
    kept = EvictionPolicy(keep=0.5, sink=SINK, window=WINDOW).num_kept(300)
    assert kept == 150
    assert used[:4] == [2, 4, 6, 8], used
    assert all(u == math.ceil(kept / BLOCK) for u in used[4:-1]) and used[-1] == 0, used
    ev = out["traces"][0][-2]["eviction"]
    assert ev["evicted_tokens_total"] == 150 and ev["freed_blocks_total"] == 5
    req = next(iter(ev["requests"].values()))
    assert req["logical_tokens"] - req["physical_tokens"] == 150

    # round 1: the keep=1.0 and the short request evicted nothing
    ev = out["traces"][1][-1]["eviction"]
    evicted = (260 - EvictionPolicy(keep=0.5, sink=SINK, window=WINDOW).num_kept(260)) \
        + (150 - EvictionPolicy(keep=0.25, sink=SINK, window=WINDOW).num_kept(150))
    assert ev["evicted_tokens_total"] == 150 + evicted
    # round 2: no stale prefix hit for the compacted prompt; evicting requests skip the cache
    assert out["rounds"][2][0]["num_cached_tokens"] == 0
    assert out["rounds"][2][1]["num_cached_tokens"] == 0
    assert out["traces"][2][-1]["free_blocks"] == idle


def test_keep_one_is_stock_vllm(models, tmp_path):
    """keep=1.0 server-wide (eviction machinery installed): the same logprobs as stock vLLM."""
    served, _ = models["llama"]
    rounds = [[{"prompt": _prompt(300, 6), "max_tokens": 8}, {"prompt": _prompt(90, 7), "max_tokens": 8}]]
    stock = run_vllm(served, rounds, tmp_path, **ENGINE)
    evict = run_vllm(served, rounds, tmp_path, **ENGINE, **evict_engine(1.0))
    assert evict["rounds"] == stock["rounds"]
    assert evict["num_gpu_blocks"] == stock["num_gpu_blocks"]
