"""Concurrency under a fixed KV budget: unmodified model vs factored (thin-key) model.

    python -m loadtests.concurrency [--rank 16] [--kv-cache-memory 1GiB] [--context 2048]
        [--output-tokens 64] [--users 4,8,16,24] [--requests-per-user 2] [--max-duration 600]

Starts a baseline server (the default model, or --model) and a factored server (its
r-rank thin-key copy, or --factored) one after the other with the SAME
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


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


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


def _parse_metrics(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"vllm:num_requests_running", "vllm:num_requests_waiting",
              "vllm:kv_cache_usage_perc", "vllm:num_preemptions_total",
              "vllm:generation_tokens_total"}
    out: dict[str, float] = {"t": time.perf_counter()}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in wanted:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


async def sample_metrics(session, url: str, samples: list[dict], stop: asyncio.Event,
                         period: float = 0.25) -> None:
    while not stop.is_set():
        try:
            async with session.get(f"{url}/metrics") as r:
                samples.append(_parse_metrics(await r.text()))
        except Exception:  # noqa: BLE001 - a missed sample is not a failure of the server
            pass
        try:
            await asyncio.wait_for(stop.wait(), period)
        except asyncio.TimeoutError:
            pass


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
        before = await _fetch_metrics(session, url)
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
        after = await _fetch_metrics(session, url)
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
    pr.preemptions = after.get("vllm:num_preemptions_total", 0.0) - before.get("vllm:num_preemptions_total", 0.0)
    ttft = [r.ttft for r in ok if r.ttft is not None]
    tpot = [r.tpot for r in ok if r.tpot is not None]
    pr.ttft_p50, pr.ttft_p99 = percentile(ttft, 50), percentile(ttft, 99)
    pr.tpot_p50, pr.tpot_p99 = percentile(tpot, 50), percentile(tpot, 99)
    pr.mean_prompt_tokens = statistics.fmean([r.prompt_tokens for r in ok]) if ok else 0.0
    pr.errors = sorted({r.error for r in results if not r.ok})[:5]
    return pr


def saturated_throughput(samples: list[dict]) -> float | None:
    """Generated tokens/s over the sampling intervals during which requests were waiting
    (the KV cache was full), from vllm:generation_tokens_total; None if never saturated."""
    tokens = seconds = 0.0
    for a, b in zip(samples, samples[1:]):
        if a.get("vllm:num_requests_waiting", 0) > 0 and b.get("vllm:num_requests_waiting", 0) > 0:
            tokens += b.get("vllm:generation_tokens_total", 0) - a.get("vllm:generation_tokens_total", 0)
            seconds += b["t"] - a["t"]
    return tokens / seconds if seconds >= 5 else None


async def _fetch_metrics(session, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as r:
        return _parse_metrics(await r.text())


def _get_json(url: str, api_key: str | None = None) -> dict:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def sweep(url: str, label: str, model_dir: Path, args, api_key: str | None = None) -> dict:
    """Every offered user count against one server; returns its KV facts and points."""
    served = _get_json(f"{url}/v1/models", api_key)["data"][0]["id"]
    kv = _get_json(f"{url}/v1/kv-cache?context={args.context}", api_key)
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
    eviction = _get_json(f"{url}/v1/kv-cache", api_key).get("eviction", {})
    eviction.pop("requests", None)
    return {"label": label, "model": str(model_dir), "served_name": served, "kv": kv,
            "points": points, "eviction": eviction}


# ----------------------------------------------------------------------------- report

def write_report(runs: list[dict], args, out_dir: Path, command: str, load: tuple[float, float]) -> Path:
    import platform

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "runs": runs, "load_average": load}, indent=1))
    plots = plot(runs, out_dir, args.name)
    lines = ["# Concurrency under a fixed KV budget", "",
             f"Command: `{command}`", "",
             f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), 1-minute load average "
             f"{load[0]:.2f} before, {load[1]:.2f} after. Each user sends {args.requests_per_user} "
             f"streaming chat request(s) back to back: ~{args.context - args.output_tokens} prompt tokens "
             f"of Wikipedia text and exactly {args.output_tokens} output tokens (ignore_eos), "
             f"so each request holds up to {args.context} tokens of KV cache.", ""]
    lines += ["| model | KV B/token | KV budget | KV capacity (tokens) | users at context (engine) |",
              "|---|---:|---:|---:|---:|"]
    for run in runs:
        kv = run["kv"]
        lines.append(f"| {run['label']} (`{Path(run['model']).name}`) | {kv['bytes_per_token']:,} | "
                     f"{(kv.get('budget_bytes') or kv['memory_bytes']) / 2**20:.0f} MiB | "
                     f"{kv['capacity_tokens']:,} | {kv['max_users_at_context']:.2f} |")
    lines += ["", "| model | offered users | requests | failed | peak running | mean running | "
              "peak waiting | preemptions | output tok/s | saturated tok/s | TTFT p50 / p99 (s) | "
              "TPOT p50 / p99 (ms) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for p in run["points"]:
            lines.append(
                f"| {run['label']} | {p['users']} | {p['requests']} | {p['failed']} | "
                f"{p['peak_running']:.0f} | {p['mean_running']:.1f} | {p['peak_waiting']:.0f} | "
                f"{p['preemptions']:.0f} | {p['output_tok_s']:.1f} | {_f(p['saturated_tok_s'])} | "
                f"{_f(p['ttft_p50'])} / {_f(p['ttft_p99'])} | "
                f"{_f(p['tpot_p50'], 1000)} / {_f(p['tpot_p99'], 1000)} |")
    if len(runs) >= 2:
        lines += ratio_lines(runs)
    lines += ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in plots), ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    report = out_dir / f"{args.name}.md"
    report.write_text("\n".join(lines) + "\n")
    return report


# Targets per configuration (issues 5 and 9): peak running requests and best output
# throughput, each as a ratio to the first (baseline) run.
RUNNING_TARGETS = {"factored": 1.55, "evict": 1.9, "factored+evict": 3.0}
THROUGHPUT_TARGETS = {"factored": 1.3}


def _ratio(label: str, num: float, den: float, fmt: str, target: float | None,
           unit: str = "") -> str:
    if not den:
        return f"{label}: n/a (baseline {den:g})"
    return (f"{label} {num:{fmt}} / {den:{fmt}}{unit} = **{num / den:.2f}x**"
            + (f" (target ≥ {target}x)" if target else ""))


def ratio_lines(runs: list[dict]) -> list[str]:
    """Every run against the first (the baseline), measured in the same invocation."""
    base = runs[0]
    pr_b = max(p["peak_running"] for p in base["points"])
    tp_b = max(p["output_tok_s"] for p in base["points"])
    lines = ["", f"## Ratios (each / {base['label']}, same run)", ""]
    for run in runs[1:]:
        ev = run.get("eviction") or {}
        if ev.get("enabled"):
            lines.append(f"- {run['label']}: evicted {ev['evicted_tokens_total']:,} tokens in "
                         f"{ev['compactions_total']} compactions, {ev['freed_blocks_total']:,} "
                         f"KV blocks freed")
        config = run.get("config", "")
        pr = max(p["peak_running"] for p in run["points"])
        tp = max(p["output_tok_s"] for p in run["points"])
        lines.append(
            f"- **{run['label']}**: KV capacity "
            f"{run['kv']['capacity_tokens'] / base['kv']['capacity_tokens']:.3f}x tokens; "
            + _ratio("peak concurrently running requests", pr, pr_b, ".0f", RUNNING_TARGETS.get(config))
            + "; " + _ratio("best output throughput", tp, tp_b, ".1f",
                            THROUGHPUT_TARGETS.get(config), " tok/s"))
        sat = [(p, q) for p in base["points"] for q in run["points"] if p["users"] == q["users"]
               and p["saturated_tok_s"] and q["saturated_tok_s"]]
        lines += [f"  - generation tok/s while the baseline's cache was full and requests waited, "
                  f"N={p['users']}: {q['saturated_tok_s']:.1f} / {p['saturated_tok_s']:.1f} = "
                  f"{q['saturated_tok_s'] / p['saturated_tok_s']:.2f}x" for p, q in sat]
    failed = sum(p["failed"] for r in runs for p in r["points"])
    lines.append(f"- failed requests: {failed}")
    return lines


def _f(v: float | None, scale: float = 1.0) -> str:
    return "-" if v is None else f"{v * scale:.2f}" if scale == 1.0 else f"{v * scale:.0f}"


def plot(runs: list[dict], out_dir: Path, name: str = "concurrency") -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = [(f"{name}_running.png", "Concurrently running requests", "peak_running", 1.0,
              "peak running requests"),
             (f"{name}_throughput.png", "Output throughput", "output_tok_s", 1.0, "output tokens/s"),
             (f"{name}_latency.png", "Latency (p50)", "ttft_p50", 1.0, "TTFT p50 (s)")]
    paths = []
    for fname, title, key, scale, ylabel in specs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for run in runs:
            xs = [p["users"] for p in run["points"]]
            ax.plot(xs, [(p[key] or 0) * scale for p in run["points"]], marker="o", label=run["label"])
            if key == "ttft_p50":
                ax2 = ax.twinx() if not hasattr(ax, "_fkv_twin") else ax._fkv_twin
                ax._fkv_twin = ax2
                ax2.plot(xs, [(p["tpot_p50"] or 0) * 1000 for p in run["points"]], linestyle="--",
                         marker="x", label=f"{run['label']} TPOT")
                ax2.set_ylabel("TPOT p50 (ms, dashed)")
        if key == "peak_running":
            xs = sorted({p["users"] for r in runs for p in r["points"]})
            ax.plot(xs, xs, color="grey", linestyle=":", label="offered")
        ax.set_xlabel("offered concurrent users")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left")
        fig.tight_layout()
        path = out_dir / fname
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="unmodified HF model dir (default: the prepared default model)")
    ap.add_argument("--factored", help="factored checkpoint (default: an r-rank thin copy of --model)")
    ap.add_argument("--rank", type=int, default=16, help="key rank of the default factored copy")
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
        info = _get_json(f"{args.url.rstrip('/')}/factorkv/info", args.api_key)
        runs = [sweep(args.url.rstrip("/"), "server", Path(info["model"]), args, args.api_key)]
    else:
        from loadtests.decode_throughput import factored_copy
        from loadtests.server_process import running_server

        thin = Path(args.factored) if args.factored else factored_copy(base, args.rank)
        runs = []
        common = ("--kv-cache-memory", args.kv_cache_memory, "--max-model-len", str(args.context),
                  "--max-num-seqs", str(args.max_num_seqs), "--disable-uvicorn-access-log",
                  *(("--block-size", str(args.block_size)) if args.block_size else ()))
        thin_label = f"factored r={args.rank}" if not args.factored else "factored"
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
