"""Decode throughput: factored default model (thin keys and RoPE-exact latent keys, FactorKV
CPU backends) vs the unmodified model (vLLM's CPU_ATTN), same batch and context, measured
side by side.

    python -m loadtests.decode_throughput [--rank 16] [--keys thin,latent] [--batches 1,8,32]
                                          [--contexts 512,2048]

Latent keys add arithmetic, not memory: per decoded token and layer they reconstruct every
cached key, T · H_kv · D · r_L multiply-adds (r_L = H_kv · r), on top of the ordinary
T · H · 2D of QK + PV and the model's ~N_params per token. At equal efficiency their speed is
at most (N + L·T·H·2D) / (N + L·T·H·2D + L·T·H_kv·D·r_L) of the original's (the "ceiling"
column; the report states the numbers it uses).

Method: per (batch B, context C) the B prompts of C tokens are prefilled once
(max_tokens=1) so the prefix cache holds them; then they are submitted again with
max_tokens=1+N and the engine is stepped by hand (in-process engine core): every
step taken once all B requests have their first token is a pure decode step, and
decode throughput = tokens produced in those steps / their wall time. Each model runs
in its own process; the whole comparison is repeated and the median kept.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from server.sizes import parse_size

ROOT = Path(__file__).resolve().parent.parent


def worker(model: str, out: str, batches: list[int], contexts: list[int], new_tokens: int,
           kv_bytes: int) -> None:
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_len = max(contexts) + new_tokens + 8
    llm = LLM(model=model, dtype="float32", enforce_eager=True, kv_cache_memory_bytes=kv_bytes,
              max_model_len=max_len, max_num_seqs=max(batches), enable_prefix_caching=True,
              max_num_batched_tokens=max(4096, max_len), seed=0)
    results = []
    for c in contexts:
        for b in batches:
            g = torch.Generator().manual_seed(1000 * c + b)
            prompts = [TokensPrompt(prompt_token_ids=torch.randint(100, 40000, (c,), generator=g)
                                    .tolist()) for _ in range(b)]

            warm = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False)
            llm.generate(prompts, warm, use_tqdm=False)      # prompts into the prefix cache
            tps, steps = timed_decode(llm, prompts, new_tokens)
            results.append({"batch": b, "context": c, "decode_tok_s": tps, "decode_steps": steps})
            print(f"  {Path(model).name:40s} B={b:3d} C={c:5d}  {tps:8.1f} tok/s", flush=True)
    cache = llm.llm_engine.vllm_config.cache_config
    json.dump({"model": model, "num_gpu_blocks": cache.num_gpu_blocks,
               "block_size": cache.block_size, "results": results},
              open(out, "w"))


def timed_decode(llm, prompts, new_tokens: int) -> tuple[float, int]:
    """(decode tokens/s, number of pure-decode steps) for one batch, stepping the engine."""
    from vllm import SamplingParams
    eng = llm.llm_engine
    sp = SamplingParams(max_tokens=1 + new_tokens, temperature=0.0, ignore_eos=True,
                        detokenize=False)
    tag = time.time_ns()
    for i, p in enumerate(prompts):
        eng.add_request(f"bench-{tag}-{i}", p, sp)
    seen: dict[str, int] = {}
    busy, tokens, steps = 0.0, 0, 0
    while eng.has_unfinished_requests():
        all_decoding = len(seen) == len(prompts)
        t = time.perf_counter()
        outs = eng.step()
        dt = time.perf_counter() - t
        new = 0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            new += n - seen.get(o.request_id, 0)
            seen[o.request_id] = n
        if all_decoding and new:
            busy, tokens, steps = busy + dt, tokens + new, steps + 1
    return tokens / max(busy, 1e-9), steps


def factored_copy(src: Path, rank: int) -> Path:
    """A thin-key copy of src at `rank` (first rotary pairs; throughput does not depend on
    which pairs are kept), cached next to the source."""
    from model_patches.conversion.checkpoint_writer import write_rotary_pair_subset
    dst = src.parent / f"{src.name}-thin-r{rank}"
    if not (dst / "config.json").exists():
        write_rotary_pair_subset(src, dst, rank)
    return dst


def latent_copy(src: Path, rank: int, groups: int = 1) -> Path:
    """A latent-key copy of src at `rank` with `groups` latents per layer (weight PCA of W_K:
    throughput does not depend on the factors' values), cached next to the source."""
    from model_patches.conversion.checkpoint_writer import write_factored
    from model_patches.conversion.latent_init import weight_pca_latent
    dst = src.parent / (f"{src.name}-latent-r{rank}" + (f"-g{groups}" if groups > 1 else ""))
    if not (dst / "config.json").exists():
        cfg, state, fk = weight_pca_latent(src, rank, groups, method="latent-weight-pca")
        write_factored(src, dst, cfg=cfg, family="llama", state=state, fk=fk)
    return dst


def per_head_copy(src: Path, rank: int) -> Path:
    """latent_copy with one latent per KV head (r_g = r: a third of the rebuild work of a joint
    latent over 3 KV heads)."""
    from engine.checkpoint import model_dims, read_config
    return latent_copy(src, rank, model_dims(read_config(src))[2])


def ceiling(cfg: dict, rank: int, context: int, groups: int = 1) -> tuple[float, float, float]:
    """(model multiply-adds per token, attention QK+PV per token, latent reconstruction per
    token) at one context, for `groups` latents per layer (r_g = H_kv / groups · rank);
    ceiling = (a + b) / (a + b + c)."""
    from engine.checkpoint import model_dims
    n_layers, h, h_kv, d, hidden = model_dims(cfg)
    inter = cfg.get("intermediate_size", 4 * hidden)
    per_layer = hidden * (h * d + 2 * h_kv * d + h * d) + 3 * hidden * inter
    model = n_layers * per_layer + cfg.get("vocab_size", 0) * hidden
    attn = n_layers * context * h * 2 * d
    rebuild = n_layers * context * h_kv * d * (h_kv // groups * rank)
    return model, attn, rebuild


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="unmodified HF model dir (default: the prepared default model)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--keys", default="thin,latent", help="factored forms to time")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--kv-cache-memory", default="4GiB")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "docs/results/engine.md"))
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    batches = [int(x) for x in args.batches.split(",")]
    contexts = [int(x) for x in args.contexts.split(",")]
    kv_bytes = parse_size(args.kv_cache_memory)
    if args.worker:
        worker(args.worker[0], args.worker[1], batches, contexts, args.new_tokens, kv_bytes)
        return

    if args.model:
        base = Path(args.model)
    else:
        from model_patches.conversion.default_model import prepare_default_model
        base = prepare_default_model()
    # latent-torch: the latent model on the backend's torch decode path (FACTORKV_CPU_KERNEL=0)
    copies = {"thin": factored_copy, "latent": latent_copy, "latent-torch": latent_copy,
              "latent-per-head": per_head_copy}
    keys = [k for k in args.keys.split(",") if k]
    if not keys or any(k not in copies for k in keys):
        ap.error(f"--keys takes a comma list of {', '.join(copies)}")
    models = {"baseline": base, **{k: copies[k](base, args.rank) for k in keys}}
    runs: dict[str, list[dict]] = {name: [] for name in models}
    # In-process engine core (so steps can be timed); vLLM would drop the serving process to
    # one torch thread, so give it the machine's cores explicitly, as a served worker has.
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count()))
    load_before = os.getloadavg()[0]
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    for rep in range(args.repeats):
        for name, model in models.items():
            out = tmp / f"factorkv-decode-{name}-{rep}.json"
            print(f"[{rep + 1}/{args.repeats}] {name}: {model}", flush=True)
            cmd = [sys.executable, "-m", "loadtests.decode_throughput", "--worker", str(model),
                   str(out), "--batches", args.batches, "--contexts", args.contexts,
                   "--new-tokens", str(args.new_tokens), "--kv-cache-memory", args.kv_cache_memory]
            kernel = {"FACTORKV_CPU_KERNEL": "0"} if name.endswith("-torch") else {}
            subprocess.run(cmd, check=True, cwd=ROOT, env={**env, **kernel},
                           stderr=subprocess.DEVNULL)
            runs[name].append(json.loads(out.read_text()))
    write_report(args, models, runs, batches, contexts, (load_before, os.getloadavg()[0]),
                 env["OMP_NUM_THREADS"])


def _median(runs: list[dict], b: int, c: int) -> float:
    return statistics.median(r["decode_tok_s"] for run in runs for r in run["results"]
                             if r["batch"] == b and r["context"] == c)


def write_report(args, models: dict[str, Path], runs: dict, batches, contexts,
                 load: tuple[float, float], threads: str) -> None:
    import platform

    import torch
    import vllm

    from engine.checkpoint import model_dims, read_config
    names = [n for n in models if n != "baseline"]
    backend = {"thin": "FactorKV's thin-key CPU backend (C++ decode kernel)",
               "latent": "FactorKV's latent-key backend (C++ decode kernel: per block, "
                         "rebuild and rotate each cached key, scores, online softmax)",
               "latent-torch": "the latent-key backend's torch decode path (gather, one GEMM "
                               "per step reconstructs every cached key, RoPE, scores)",
               "latent-per-head": "the latent-key backend's C++ kernel, one latent per KV head "
                                  "(r_g = r)"}
    lines = [
        "# Engine: decode throughput, factored vs unmodified (CPU)", "",
        f"Command: `python -m loadtests.decode_throughput --rank {args.rank} --keys {args.keys} "
        f"--batches {args.batches} --contexts {args.contexts} --new-tokens {args.new_tokens} "
        f"--kv-cache-memory {args.kv_cache_memory} --repeats {args.repeats}`", "",
        f"Machine: {os.cpu_count()} CPU cores, {platform.processor() or platform.machine()}; "
        f"torch {torch.__version__}, vLLM {vllm.__version__}; float32, eager, OMP_NUM_THREADS={threads}; "
        f"1-minute load average {load[0]:.2f} before, {load[1]:.2f} after (other jobs on the machine "
        "distort 2-thread OpenMP timings badly).", "",
        f"- baseline: `{models['baseline'].name}` on vLLM's CPU_ATTN backend "
        f"({runs['baseline'][0]['num_gpu_blocks']} blocks of {runs['baseline'][0]['block_size']} tokens)",
        *[f"- {n}: `{models[n].name}` (r = {args.rank}) on {backend[n]} "
          f"({runs[n][0]['num_gpu_blocks']} blocks of {runs[n][0]['block_size']} tokens, same KV budget)"
          for n in names], "",
        "Decode tokens/s (median of repeats; prefill excluded, see the module docstring):", "",
        "| batch | context | baseline tok/s | " + " | ".join(f"{n} tok/s | {n} / baseline"
                                                        for n in names) + " |",
        "|---:|---:|---:|" + "---:|---:|" * len(names),
    ]
    cfg = read_config(models["baseline"])
    groups = {"latent": 1, "latent-torch": 1, "latent-per-head": model_dims(cfg)[2]}
    latent = [n for n in names if n in groups]
    for c in contexts:
        for b in batches:
            bt = _median(runs["baseline"], b, c)
            lines.append(f"| {b} | {c} | {bt:.1f} | " + " | ".join(
                f"{_median(runs[n], b, c):.1f} | {_median(runs[n], b, c) / bt:.2f}x"
                for n in names) + " |")
    if latent:
        lines += ["", "Latent keys against their ceiling (the speed at the original's efficiency "
                  "given the extra arithmetic; ratio / ceiling is the efficiency reached):", "",
                  "| batch | context | " + " | ".join(f"{n} / baseline | ceiling | of ceiling"
                                                     for n in latent) + " |",
                  "|---:|---:|" + "---:|---:|---:|" * len(latent)]
        for c in contexts:
            for b in batches:
                bt, cells = _median(runs["baseline"], b, c), []
                for n in latent:
                    m, a, r = ceiling(cfg, args.rank, c, groups[n])
                    ratio, ceil = _median(runs[n], b, c) / bt, (m + a) / (m + a + r)
                    cells.append(f"{ratio:.2f}x | {ceil:.2f}x | {ratio / ceil:.0%}")
                lines.append(f"| {b} | {c} | " + " | ".join(cells) + " |")
        lines += ["", "Ceiling arithmetic (multiply-adds per decoded token, "
                  "`loadtests.decode_throughput.ceiling`):", "",
                  "| context | latents per layer | model | attention QK+PV | "
                  "latent key reconstruction | ceiling |", "|---:|---:|---:|---:|---:|---:|"]
        for c in contexts:
            for g in sorted({groups[n] for n in latent}):
                m, a, r = ceiling(cfg, args.rank, c, g)
                lines.append(f"| {c} | {g} | {m / 1e6:.1f} M | {a / 1e6:.1f} M | "
                             f"{r / 1e6:.1f} M | {(m + a) / (m + a + r):.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
