"""Run vLLM offline on token-id prompts in a fresh process and dump what the tests compare.

    python -m tests._vllm_probe SPEC.json OUT.json

SPEC: {"model": path, "engine": {LLM kwargs}, "trace": bool, "rounds": [[{"prompt": [ids],
       "max_tokens": n, "prompt_logprobs": k|null, "logprobs": k, "extra_args": {..}}...], ...]}
Each round is one `generate` call (a batch); later rounds can hit the prefix cache of earlier ones.
With "trace" (needs VLLM_ENABLE_V1_MULTIPROCESSING=0) the round is stepped by hand and the
scheduler's free KV blocks (and eviction stats, if any) are recorded after every step.
OUT: {"num_gpu_blocks", "block_size", "kv_cache_tokens", "rounds": [[{"tokens", "logprobs":
      [{id: lp}], "prompt_logprobs": [{id: lp}|null], "num_cached_tokens"}]], "traces": [[{
      "free_blocks", "eviction"}]]}
"""

from __future__ import annotations

import json
import sys
import time


def _lp(d):
    return None if d is None else {str(k): v.logprob for k, v in d.items()}


def _stepped(llm, prompts, params):
    """Run one batch step by step; return outputs in prompt order and a per-step trace."""
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    ids = [f"probe-{time.monotonic_ns()}-{i}" for i in range(len(prompts))]
    for rid, prompt, p in zip(ids, prompts, params):
        engine.add_request(rid, prompt, p)
    done, trace = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        stats = getattr(scheduler, "eviction_stats", None)
        trace.append({"free_blocks": scheduler.kv_cache_manager.block_pool.get_num_free_blocks(),
                      "eviction": stats() if stats else None})
    return [done[r] for r in ids], trace


def main(spec_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = json.loads(open(spec_path).read())
    engine = {"dtype": "float32", "enforce_eager": True, "skip_tokenizer_init": True,
              "max_model_len": 1024, "seed": 0, **spec.get("engine", {})}
    t0 = time.time()
    llm = LLM(model=spec["model"], **engine)
    startup = time.time() - t0
    cache = llm.llm_engine.vllm_config.cache_config
    rounds, traces = [], []
    for batch in spec["rounds"]:
        prompts = [TokensPrompt(prompt_token_ids=r["prompt"]) for r in batch]
        params = [SamplingParams(max_tokens=r.get("max_tokens", 8), temperature=0.0,
                                 logprobs=r.get("logprobs", 5),
                                 prompt_logprobs=r.get("prompt_logprobs"), detokenize=False,
                                 ignore_eos=True, extra_args=r.get("extra_args"))
                  for r in batch]
        if spec.get("trace"):
            outs, trace = _stepped(llm, prompts, params)
            traces.append(trace)
        else:
            outs = llm.generate(prompts, params, use_tqdm=False)
        rounds.append([{
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [_lp(d) for d in (o.outputs[0].logprobs or [])],
            "prompt_logprobs": [_lp(d) for d in (o.prompt_logprobs or [])],
            "num_cached_tokens": o.num_cached_tokens or 0,
        } for o in outs])
    json.dump({"num_gpu_blocks": cache.num_gpu_blocks, "block_size": cache.block_size,
               "kv_cache_tokens": cache.num_gpu_blocks * cache.block_size,
               "startup_s": startup, "rounds": rounds, "traces": traces}, open(out_path, "w"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
