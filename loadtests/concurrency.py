"""Concurrency under a fixed KV budget: unmodified model vs factored-key model.

    python -m loadtests.concurrency [--rank 16] [--keys latent|thin] [--kv-cache-memory 1GiB]
        [--context 2048] [--output-tokens 64] [--users 4,8,16,24] [--requests-per-user 2]
        [--max-duration 600]

Starts a baseline server (the default model, or --model) and a factored server (its
r-rank copy with ``--keys`` latent keys (the served default's form) or thin keys, or
--factored) one after the other with the SAME
``--kv-cache-memory`` and a ``--max-num-seqs`` far above the user counts, so the KV
cache is the only limit. For each offered user count N, N simulated chat users each
send ``--requests-per-user`` streaming requests back to back: a prompt of real text
(gensim Wikipedia, a distinct window per request with a unique first line, so the
prefix cache shares nothing) filling ``context − output_tokens`` tokens, and exactly
``--output-tokens`` output tokens (``ignore_eos``). /metrics is sampled every
``--sample-period`` s (0.25).

Recorded per (model, N): peak and mean concurrently running requests
(``vllm:num_requests_running``), peak waiting, preemptions (``vllm:num_preemptions``
delta), output tokens/s over the point's wall time, TTFT and TPOT p50/p99, failed
requests. Output: a Markdown report, a JSON file and three PNG plots (running vs
offered users, output throughput vs users, latency vs users; both models on each).

``--configs`` picks the servers (same budget each): ``baseline`` (unmodified),
``factored``, ``evict`` (unmodified + ``--kv-evict``), ``factored+evict``; the default is
``baseline,factored``. ``--kv-evict keep=0.5`` sets the eviction policy and
``--block-size`` the KV block size of every server (eviction frees whole blocks, so
smaller blocks return more of the evicted memory).

``--url`` drives one already running server instead (a smoke test: no sweep of models).
All traffic goes to 127.0.0.1 (or the given URL); every point is bounded by
``--max-duration`` (no new requests after it) and a per-request timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loadtests.concurrency_report import write_report
from loadtests.metrics import (counter_delta, fetch_metrics, get_json, percentile,
                               sample_metrics, saturated_throughput)

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_SLACK = 64   # chat-template and header tokens on top of the text window


@dataclass
class RequestResult:
    ok: bool
    ttft: float | None = None
    tpot: float | None = None
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


@dataclass
class PointResult:
    model: str
    users: int
    requests: int = 0
    failed: int = 0
    wall_s: float = 0.0
    output_tokens: int = 0
    output_tok_s: float = 0.0
    peak_running: float = 0.0
    mean_running: float = 0.0
    peak_waiting: float = 0.0
    peak_kv_usage: float = 0.0
    preemptions: float = 0.0
    saturated_tok_s: float | None = None   # generation tok/s while requests were waiting
    ttft_p50: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p99: float | None = None
    mean_prompt_tokens: float = 0.0
    errors: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- prompts

class PromptSource:
    """Distinct windows of real text, each ``n_tokens`` long (by the model's tokenizer)."""

    def __init__(self, model_dir: str | Path, n_tokens: int, seed: int = 0):
        from transformers import AutoTokenizer

        from model_patches.text_sets import token_stream

        self.tok = AutoTokenizer.from_pretrained(str(model_dir))
        ids = token_stream(self.tok, "evaluation") + token_stream(self.tok, "calibration")
        specials = {self.tok.bos_token_id, self.tok.eos_token_id}
        self.ids = [i for i in ids if i not in specials]
        self.n = max(1, n_tokens)
        self.rng = random.Random(seed)
        self.count = 0

    def next(self) -> str:
        self.count += 1
        start = self.rng.randrange(0, max(1, len(self.ids) - self.n))
        text = self.tok.decode(self.ids[start:start + self.n])
        return f"Request {self.count}: summarise the following text.\n\n{text}"


# ----------------------------------------------------------------------------- traffic

async def one_request(session, url: str, model: str, prompt: str, output_tokens: int,
                      timeout: float, api_key: str | None) -> RequestResult:
    import aiohttp

    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": output_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.perf_counter()
    first = last = None
    usage = None
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body, headers=headers,
                                timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return RequestResult(False, error=f"HTTP {resp.status}: {(await resp.text())[:200]}")
            async for raw in resp.content:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    usage = chunk["usage"]
                for ch in chunk.get("choices") or []:
                    if (ch.get("delta") or {}).get("content"):
                        now = time.perf_counter()
                        first = first or now
                        last = now
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        return RequestResult(False, error=f"{type(e).__name__}: {e}"[:200])
    if usage is None or first is None:
        return RequestResult(False, error="stream ended without usage or content")
    n_out = int(usage.get("completion_tokens", 0))
    if n_out != output_tokens:
        return RequestResult(False, error=f"{n_out} of {output_tokens} output tokens")
    tpot = (last - first) / (n_out - 1) if n_out > 1 else None
    return RequestResult(True, ttft=first - t0, tpot=tpot, output_tokens=n_out,
                         prompt_tokens=int(usage.get("prompt_tokens", 0)))


async def run_point(url: str, model: str, label: str, users: int, requests_per_user: int,
                    prompts: PromptSource, output_tokens: int, max_duration: float,
                    request_timeout: float, api_key: str | None = None,
                    sample_period: float = 0.25) -> PointResult:
    """N users, each sending ``requests_per_user`` requests back to back."""
    import aiohttp
    from tqdm import tqdm

    total = users * requests_per_user
    results: list[RequestResult] = []
    samples: list[dict] = []
    stop = asyncio.Event()
    conn = aiohttp.TCPConnector(limit=0)
    bar = tqdm(total=total, desc=f"{label} N={users}", unit="req", file=sys.stderr, leave=True)
    async with aiohttp.ClientSession(connector=conn) as session:
        before = await fetch_metrics(session, url)
        sampler = asyncio.create_task(sample_metrics(session, url, samples, stop, sample_period))
        t0 = time.perf_counter()

        async def user() -> None:
            for _ in range(requests_per_user):
                if time.perf_counter() - t0 > max_duration:
                    return
                r = await one_request(session, url, model, prompts.next(), output_tokens,
                                      request_timeout, api_key)
                results.append(r)
                bar.update(1)

        await asyncio.gather(*(user() for _ in range(users)))
        wall = time.perf_counter() - t0
        stop.set()
        await sampler
        after = await fetch_metrics(session, url)
    bar.close()
    ok = [r for r in results if r.ok]
    pr = PointResult(model=label, users=users, requests=len(results),
                     failed=len(results) - len(ok), wall_s=wall)
    pr.output_tokens = sum(r.output_tokens for r in ok)
    pr.output_tok_s = pr.output_tokens / wall if wall > 0 else 0.0
    running = [s.get("vllm:num_requests_running", 0.0) for s in samples]
    pr.peak_running = max(running, default=0.0)
    pr.mean_running = statistics.fmean(running) if running else 0.0
    pr.peak_waiting = max((s.get("vllm:num_requests_waiting", 0.0) for s in samples), default=0.0)
    pr.peak_kv_usage = max((s.get("vllm:kv_cache_usage_perc", 0.0) for s in samples), default=0.0)
    pr.saturated_tok_s = saturated_throughput(samples)
    pr.preemptions = counter_delta(before, after, "vllm:num_preemptions_total")
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    pr.ttft_p50, pr.ttft_p99 = percentile(ttft, 50), percentile(ttft, 99)
    pr.tpot_p50, pr.tpot_p99 = percentile(tpot, 50), percentile(tpot, 99)
    pr.mean_prompt_tokens = statistics.fmean([r.prompt_tokens for r in ok]) if ok else 0.0
    pr.errors = sorted({r.error for r in results if not r.ok})[:5]
    return pr


def sweep(url: str, label: str, model_dir: Path, args, api_key: str | None = None) -> dict:
    """Every offered user count against one server; returns its KV facts and points."""
    served = get_json(f"{url}/v1/models", api_key)["data"][0]["id"]
    kv = get_json(f"{url}/v1/kv-cache?context={args.context}", api_key)
    prompts = PromptSource(model_dir, args.context - args.output_tokens - TEMPLATE_SLACK, seed=args.seed)
    points = []
    for n in args.user_counts:
        pr = asyncio.run(run_point(url, served, label, n, args.requests_per_user, prompts,
                                   args.output_tokens, args.max_duration, args.request_timeout, api_key,
                                   args.sample_period))
        print(f"  {label} N={n}: peak running {pr.peak_running:.0f}, preemptions {pr.preemptions:.0f}, "
              f"{pr.output_tok_s:.1f} out tok/s, TTFT p50 {pr.ttft_p50 or 0:.1f}s, failed {pr.failed}",
              file=sys.stderr, flush=True)
        points.append(asdict(pr))
    eviction = get_json(f"{url}/v1/kv-cache", api_key).get("eviction", {})
    eviction.pop("requests", None)
    return {"label": label, "model": str(model_dir), "served_name": served, "kv": kv,
            "points": points, "eviction": eviction}


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="unmodified HF model dir (default: the prepared default model)")
    ap.add_argument("--factored", help="factored checkpoint (default: an r-rank --keys copy of --model)")
    ap.add_argument("--rank", type=int, default=16, help="key rank of the default factored copy")
    ap.add_argument("--keys", choices=("latent", "thin"), default="latent",
                    help="key form of the default factored copy (latent: the served default's)")
    ap.add_argument("--kv-cache-memory", default="1GiB", help="KV budget of both servers")
    ap.add_argument("--context", type=int, default=2048, help="tokens per request (prompt + output)")
    ap.add_argument("--output-tokens", type=int, default=64)
    ap.add_argument("--users", default="4,8,16,24", help="offered concurrent users, comma-separated")
    ap.add_argument("--requests-per-user", type=int, default=2)
    ap.add_argument("--max-duration", type=float, default=600, help="s per point; no new requests after")
    ap.add_argument("--request-timeout", type=float, default=900)
    ap.add_argument("--sample-period", type=float, default=0.25, help="s between /metrics samples")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--url", help="drive this running server only (smoke test), e.g. http://127.0.0.1:8000")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="report directory")
    ap.add_argument("--name", default="concurrency", help="report file stem (NAME.md, NAME.json, NAME_*.png)")
    ap.add_argument("--configs", default="baseline,factored",
                    help="servers to compare, first = reference: baseline, factored, evict, factored+evict")
    ap.add_argument("--kv-evict", default="keep=0.5", help="eviction policy of the *evict configs")
    ap.add_argument("--block-size", type=int, default=None, help="KV block size of every server")
    args = ap.parse_args(argv)
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.config_list if c not in ("baseline", "factored", "evict", "factored+evict")]
    if bad or not args.config_list:
        ap.error(f"--configs: unknown {', '.join(bad) or '(empty)'}")
    args.user_counts = [int(x) for x in args.users.split(",") if x.strip()]
    if not args.user_counts or min(args.user_counts) < 1:
        ap.error("--users needs positive counts")
    if not 0 < args.output_tokens < args.context - TEMPLATE_SLACK:
        ap.error("--output-tokens must be positive and leave room for a prompt in --context")
    command = "python -m loadtests.concurrency " + " ".join(argv if argv is not None else sys.argv[1:])
    load0 = os.getloadavg()[0]

    from model_patches.conversion.default_model import prepare_default_model

    base = Path(args.model) if args.model else prepare_default_model()
    if args.url:
        info = get_json(f"{args.url.rstrip('/')}/factorkv/info", args.api_key)
        runs = [sweep(args.url.rstrip("/"), "server", Path(info["model"]), args, args.api_key)]
    else:
        from loadtests.decode_throughput import factored_copy, latent_copy
        from loadtests.server_process import running_server

        copy = latent_copy if args.keys == "latent" else factored_copy
        thin = Path(args.factored) if args.factored else copy(base, args.rank)
        runs = []
        common = ("--kv-cache-memory", args.kv_cache_memory, "--max-model-len", str(args.context),
                  "--max-num-seqs", str(args.max_num_seqs), "--disable-uvicorn-access-log",
                  *(("--block-size", str(args.block_size)) if args.block_size else ()))
        thin_label = f"factored {args.keys} r={args.rank}" if not args.factored else "factored"
        for config in args.config_list:
            model = thin if config.startswith("factored") else base
            label = {"baseline": "baseline", "factored": thin_label, "evict": f"evict {args.kv_evict}",
                     "factored+evict": f"{thin_label} + evict {args.kv_evict}"}[config]
            extra = ("--kv-evict", args.kv_evict) if config.endswith("evict") else ()
            print(f"starting {label}: {model}", file=sys.stderr, flush=True)
            with running_server("--model", str(model), *common, *extra) as srv:
                run = sweep(srv.base_url, label, model, args)
                run["config"] = config
                runs.append(run)
    report = write_report(runs, args, Path(args.out), command, (load0, os.getloadavg()[0]))
    print(report.read_text())
    return 0 if all(p["failed"] == 0 for r in runs for p in r["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
