"""The served engine against the plain-torch eviction benchmark, on the default model.

    python -m loadtests.eviction_crosscheck [--n 20] [--length 2048] [--keeps 1.0,0.5,0.1]

Runs the passkey prompts of ``model_patches.evaluation.eviction_quality`` (engine mode: the whole prompt
is evicted after prefill) through vLLM with FactorKV's eviction scheduler and worker, greedy,
8 tokens, and compares each answer with the one the torch benchmark cached
(``~/.cache/factorkv/eviction``; run ``make bench-eviction-quality`` first). Prints how many
answers are identical per keep.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="eviction_crosscheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--keeps", default="1.0,0.5,0.1")
    ap.add_argument("--work", default=str(Path.home() / ".cache" / "factorkv" / "eviction"))
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from model_patches.conversion.default_model import prepare_default_model
    from model_patches.evaluation.eviction_quality.tasks import passkey_items

    model = prepare_default_model(quiet=True)
    tok = AutoTokenizer.from_pretrained(model)
    cached = json.loads((Path(args.work) / "results" / "eviction.json").read_text())["metrics"]
    items = passkey_items(tok, args.length, args.n)
    keeps = [float(k) for k in args.keeps.split(",")]
    llm = LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=args.length + 64,
              kv_cache_memory_bytes=1 << 30, seed=0, enable_prefix_caching=False,
              scheduler_cls="engine.eviction.scheduler.EvictionScheduler",
              worker_cls="engine.eviction.worker.EvictingCPUWorker",
              additional_config={"factorkv_kv_evict": {"keep": 1.0, "sink": 4, "window": 64}})
    report = {}
    for keep in keeps:
        params = SamplingParams(max_tokens=8, temperature=0.0, extra_args={"kv_evict_keep": keep})
        outs = llm.generate([TokensPrompt(prompt_token_ids=it["ids"]) for it in items],
                            [params] * len(items), use_tqdm=False)
        tag = "none" if keep >= 1 else f"engine/keep{keep:g}-s4-w64"
        same = missing = 0
        for j, (it, out) in enumerate(zip(items, outs)):
            want = cached.get(f"passkey/len{args.length}/seed0/i{j}-d{it['depth']}-{it['answer']}/{tag}")
            if want is None:
                missing += 1
                continue
            same += tok.decode(out.outputs[0].token_ids, skip_special_tokens=True) == want
        report[keep] = (same, len(items) - missing)
        print(f"keep {keep:g}: {same}/{len(items) - missing} vLLM answers identical to the torch "
              f"benchmark's" + (f" ({missing} not in the cache)" if missing else ""), flush=True)
    return 0 if all(s == n for s, n in report.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
