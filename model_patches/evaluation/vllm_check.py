"""Prompt NLL of token windows through the served vLLM engine (in-process, eager, float32).

    python -m model_patches.evaluation.vllm_check SPEC.json OUT.json

SPEC: {"model": dir, "windows": [[ids]...], "engine": {extra LLM kwargs}}
OUT:  {"nll": [[-logprob of token j | j = 1..ctx-1] per window], "seconds", "startup_s",
       "kv_cache_tokens"}
or (greedy generation, e.g. passkey prompts that share a long prefix)
SPEC: {"model": dir, "mode": "generate", "prompts": [[ids]...], "max_tokens": n,
       "prefix": [ids] (optional, run first so that its blocks are in the prefix cache)}
OUT:  {"tokens": [[generated ids]...], "cached_tokens": [...], "seconds", "startup_s"}

Run it in a fresh process (vLLM starts its own workers; the caller sets
VLLM_ENABLE_V1_MULTIPROCESSING=0 to keep the engine in this process). Each window is one
prompt with ``prompt_logprobs=0`` (the logprob of every prompt token) and one greedy output
token; prefix caching is off (no window reuses another's blocks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(Path(spec_path).read_text())
    if spec.get("mode") == "generate":
        return generate(spec, out_path)
    windows = spec["windows"]
    ctx = max(len(w) for w in windows)
    engine = {"dtype": "float32", "enforce_eager": True, "skip_tokenizer_init": True,
              "max_model_len": ctx + 8, "seed": 0, "enable_prefix_caching": False,
              "kv_cache_memory_bytes": 1 << 30, **spec.get("engine", {})}
    t0 = time.time()
    llm = LLM(model=spec["model"], **engine)
    startup = time.time() - t0
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
    t0 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params,
                        use_tqdm=False)
    nll = []
    for w, o in zip(windows, outs):
        lps = o.prompt_logprobs
        nll.append([-lps[j][w[j]].logprob for j in range(1, len(w))])
    cache = llm.llm_engine.vllm_config.cache_config
    Path(out_path).write_text(json.dumps({
        "nll": nll, "seconds": time.time() - t0, "startup_s": startup,
        "kv_cache_tokens": (cache.num_gpu_blocks or 0) * cache.block_size}))


def generate(spec: dict, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = spec["prompts"]
    n_new = spec.get("max_tokens", 8)
    engine = {"dtype": "float32", "enforce_eager": True, "skip_tokenizer_init": True,
              "max_model_len": max(len(p) for p in prompts) + n_new + 8, "seed": 0,
              "enable_prefix_caching": True, "kv_cache_memory_bytes": 1 << 30,
              "max_num_seqs": 8, **spec.get("engine", {})}
    t0 = time.time()
    llm = LLM(model=spec["model"], **engine)
    startup = time.time() - t0
    t0 = time.time()
    if spec.get("prefix"):
        llm.generate([TokensPrompt(prompt_token_ids=spec["prefix"])],
                     SamplingParams(max_tokens=1, detokenize=False), use_tqdm=False)
    params = SamplingParams(max_tokens=n_new, temperature=0.0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                        use_tqdm=False)
    Path(out_path).write_text(json.dumps({
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "cached_tokens": [o.num_cached_tokens or 0 for o in outs],
        "seconds": time.time() - t0, "startup_s": startup}))


def run(model: str | Path, windows: list[list[int]] | None, work: Path, timeout: int = 3600,
        spec_extra: dict | None = None, **engine) -> dict:
    """Run :func:`main` in a fresh Python process and return its output."""
    work.mkdir(parents=True, exist_ok=True)
    spec, out = work / "vllm-spec.json", work / "vllm-out.json"
    spec.write_text(json.dumps({"model": str(model), "windows": windows, "engine": engine,
                                **(spec_extra or {})}))
    out.unlink(missing_ok=True)
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "model_patches.evaluation.vllm_check", str(spec),
                           str(out)], cwd=root, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if proc.returncode != 0 or not out.exists():
        tail = (proc.stderr or "")[-3000:]
        raise RuntimeError(f"vLLM evaluation failed (rc={proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
