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
