"""Helpers for engine tests: tiny random source models and running vLLM in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def tiny_llama(path: Path, *, heads: int = 4, kv_heads: int = 2, hidden: int = 128,
               layers: int = 2, seed: int = 0, vocab: int = 256) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=2048,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():   # larger q/k weights than the default init: peakier, more telling attention
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    model.save_pretrained(path)
    return path


def tiny_gpt2(path: Path, *, heads: int = 4, hidden: int = 128, layers: int = 2,
              seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=256, n_embd=hidden, n_layer=layers, n_head=heads,
                     n_positions=2048, bos_token_id=1, eos_token_id=2)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(4)
    model.save_pretrained(path)
    return path


def write_latent(src, dst, rank: int | list[int], groups: int, seed: int = 0):
    """A latent checkpoint of src: weight PCA (identity input moments) with B perturbed, so
    no structure of the exact PCA can hide a reconstruction bug."""
    from model_patches.conversion.checkpoint_writer import write_factored
    from model_patches.conversion.latent_init import weight_pca_latent

    cfg, state, fk = weight_pca_latent(src, rank, groups, method="latent-test")
    g = torch.Generator().manual_seed(seed)
    for k in [k for k in state if k.endswith("k_up_proj.weight")]:
        state[k] = state[k] + 0.2 * torch.randn(state[k].shape, generator=g)
    return write_factored(src, dst, cfg=cfg, family="llama", state=state, fk=fk)


def run_vllm(model: Path | str, rounds: list, tmp: Path, timeout: int = 600,
             env: dict | None = None, trace: bool = False, **engine) -> dict:
    """Run tests/_vllm_probe.py in a fresh process (engine in-process, eager, fp32);
    ``trace`` steps each round by hand and records the scheduler's free blocks per step."""
    spec = tmp / f"spec-{os.getpid()}-{len(list(tmp.glob('spec-*')))}.json"
    out = spec.with_suffix(".out.json")
    spec.write_text(json.dumps({"model": str(model), "engine": engine, "rounds": rounds,
                                "trace": trace}))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "tests._vllm_probe", str(spec), str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM probe failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def max_logprob_error(ref_logits: torch.Tensor, steps: list[dict | None], first: int) -> float:
    """Largest |vLLM logprob - reference logprob| over every reported token of every step.
    steps[j] holds the logprobs vLLM reported for position first + j."""
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    worst = 0.0
    for j, step in enumerate(steps):
        if step is None:
            continue
        for tok, lp in step.items():
            worst = max(worst, abs(lp - ref[first + j, int(tok)].item()))
    return worst


def _prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 37, 150, 90)]


def check_vllm_against_reference(path: Path, tmp: Path, block_size: int, tol: float,
                                 env: dict | None = None) -> None:
    """Serve a checkpoint through vLLM and check it against engine.torch_model.TorchCausalLM.

    Round 1: four prompts of 5..150 tokens in one batch, chunked prefill at 64 tokens (mixed
    prefill/decode steps), prompt logprobs for one; round 2: a repeated prompt and one sharing
    64 tokens with it (prefix-cache hits). Every request: the reference's greedy tokens, decode
    and prompt logprobs within ``tol``; round 2 read its shared blocks from the prefix cache."""
    from engine.torch_model import TorchCausalLM

    prompts = _prompts(7)
    shared = prompts[2][:64] + _prompts(8)[1]
    round1 = [{"prompt": p, "max_tokens": n, "prompt_logprobs": 5 if i == 2 else None}
              for i, (p, n) in enumerate(zip(prompts, (8, 12, 6, 10)))]
    round2 = [{"prompt": prompts[2], "max_tokens": 6}, {"prompt": shared, "max_tokens": 8}]
    out = run_vllm(path, [round1, round2], tmp, block_size=block_size,
                   kv_cache_memory_bytes=32 << 20, enable_prefix_caching=True,
                   max_num_batched_tokens=64, max_num_seqs=8, env=env)
    ref = TorchCausalLM.from_dir(path)
    for rnd, outs in zip([round1, round2], out["rounds"]):
        for req, got in zip(rnd, outs):
            prompt = req["prompt"]
            logits = ref(torch.tensor(prompt + got["tokens"]))
            expect = logits[len(prompt) - 1:-1].argmax(-1).tolist()
            assert got["tokens"] == expect, f"greedy tokens differ for a {len(prompt)}-token prompt"
            err = max_logprob_error(logits, got["logprobs"], len(prompt) - 1)
            assert err < tol, f"decode logprobs off by {err}"
            if req.get("prompt_logprobs"):
                err = max_logprob_error(logits, got["prompt_logprobs"], -1)
                assert err < tol, f"prompt logprobs off by {err}"
    assert out["rounds"][1][0]["num_cached_tokens"] >= block_size * ((150 - 1) // block_size)
    if block_size <= 64:
        assert out["rounds"][1][1]["num_cached_tokens"] >= 64 // block_size * block_size
