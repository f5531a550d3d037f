"""Multi-turn chat goodput under one KV budget: how many chat users each server configuration
serves within a latency SLO (``make bench-goodput``).

    python -m loadtests.goodput [--configs original,default,thin,thin+evict]
        [--kv-cache-memory 96MiB] [--users 2,3,4,5,6] [--turns 6] [--think-time 2]
        [--slo-ttft-ms 2500] [--slo-tpot-ms 500] [--slo-attainment 0.9]

For each configuration a ``factorkv serve`` with the same ``--kv-cache-memory`` and
``--block-size`` is started on 127.0.0.1 (loadtests/server_process.py), one after the other:

* ``original``: the unmodified default model (``--variant original``);
* ``default``: the served default (no ``--variant``: calibrated r = 16 latent keys);
* ``thin``: the calibrated r = 16 thin-key build (``--variant thin-r16``, the previous default);
* ``thin+evict``: that build with ``--kv-evict keep=0.5`` (eviction does not compose with
  latent keys in this release).

Against each, N simulated chat users for every N of ``--users``, driven by GuideLLM
(loadtests/goodput_client.py says how the conversations look). Recorded per point: TTFT and
TPOT p50/p99 (TTFT also over follow-up turns only), vLLM's prefix-cache hit rate and
preemptions over the point (Prometheus ``/metrics``), prompt tokens prefilled, the share of
requests meeting the SLO (TTFT and TPOT), goodput (requests/s meeting it), and whether the
point meets the SLO (that share >= ``--slo-attainment``, no failed or cut request). Per
configuration: the largest N that meets it (with every smaller N). Output: NAME.md, NAME.json
and three plots (goodput, TTFT p99 and hit rate against users); GuideLLM's own reports go
to ``--guidellm-dir``. Every point is bounded by ``--max-duration``; a configuration's sweep stops
after ``--stop-after-misses`` points in a row missed the SLO.

``--url`` drives one running server instead (a smoke test).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from loadtests.goodput_client import SLO, Workload, describe, run_point
from loadtests.goodput_report import write_report
from loadtests.metrics import get_json

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"original": ("--variant", "original"), "default": (),
           "thin": ("--variant", "thin-r16"),
           "thin+evict": ("--variant", "thin-r16", "--kv-evict", None)}  # None: --kv-evict's value


def sweep(url: str, label: str, tokenizer: str, args, wl: Workload, slo: SLO,
          work_dir: Path) -> dict:
    """Every N of --users against one server; returns its KV facts and points."""
    served = get_json(f"{url}/v1/models", args.api_key)["data"][0]["id"]
    kv = get_json(f"{url}/v1/kv-cache?context={wl.max_context()}", args.api_key)
    points = []
    for n in args.user_counts:
        t0 = time.monotonic()
        p = run_point(url, served, tokenizer, n, wl, slo, args.max_duration,
                      work_dir / label.split()[0], args.api_key)
        points.append(p)
        print(f"  {label} N={n}: {p['requests']} requests in {p['duration_s']:.0f} s "
              f"(+{time.monotonic() - t0 - p['duration_s']:.0f} s client start), "
              f"TTFT p99 {p['ttft_p99'] or 0:.2f} s, hit rate {p['prefix_hit_rate'] or 0:.2f}, "
              f"goodput {p['goodput']:.3f} req/s, SLO {'met' if p['meets_slo'] else 'missed'}, "
              f"failed {p['failed']}, cut {p['cut']}", file=sys.stderr, flush=True)
        recent = points[-args.stop_after_misses:] if args.stop_after_misses else []
        if len(recent) == args.stop_after_misses > 0 and not any(q["meets_slo"] for q in recent) \
                and n != args.user_counts[-1]:
            print(f"  {label}: {args.stop_after_misses} points in a row past the SLO, no larger N",
                  file=sys.stderr, flush=True)
            break
    return {"label": label, "served_name": served, "kv": kv, "points": points}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="original,default,thin,thin+evict",
                    help="servers to compare, first = reference: " + ", ".join(CONFIGS))
    ap.add_argument("--kv-cache-memory", default="96MiB", help="KV budget of every server")
    ap.add_argument("--block-size", type=int, default=32, help="KV block size of every server")
    ap.add_argument("--kv-evict", default="keep=0.5", help="eviction policy of thin+evict")
    ap.add_argument("--users", default="2,3,4,5,6", help="simulated users per point, comma-separated")
    w, s = Workload(), SLO()
    ap.add_argument("--turns", type=int, default=w.turns)
    ap.add_argument("--system-tokens", type=int, default=w.system_tokens,
                    help="system prompt shared by every user")
    ap.add_argument("--history-tokens", type=int, default=w.history_tokens,
                    help="each user's first message")
    ap.add_argument("--question-tokens", type=int, default=w.question_tokens,
                    help="each later message")
    ap.add_argument("--answer-tokens", type=int, default=w.answer_tokens)
    ap.add_argument("--think-time", type=float, default=w.think_time, help="s between turns")
    ap.add_argument("--rampup-per-user", type=float, default=w.rampup_per_user,
                    help="users join over this many s × N")
    ap.add_argument("--slo-ttft-ms", type=float, default=s.ttft_ms)
    ap.add_argument("--slo-tpot-ms", type=float, default=s.tpot_ms)
    ap.add_argument("--slo-attainment", type=float, default=s.attainment,
                    help="share of a point's requests that must meet the SLO")
    ap.add_argument("--max-duration", type=float, default=240, help="s per point (bound)")
    ap.add_argument("--stop-after-misses", type=int, default=2,
                    help="skip the larger N of a configuration after this many points in a row "
                         "missed the SLO (0: run every N)")
    ap.add_argument("--url", help="drive this running server only (smoke test)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--out", default=str(ROOT / "docs" / "results"), help="report directory")
    ap.add_argument("--name", default="goodput", help="report file stem")
    ap.add_argument("--guidellm-dir", default=None,
                    help="where GuideLLM's scenarios, logs and JSON reports go (default: a new "
                         "temporary directory)")
    args = ap.parse_args(argv)
    args.config_list = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [c for c in args.config_list if c not in CONFIGS]
    if bad or not args.config_list:
        ap.error(f"--configs: unknown {', '.join(bad) or '(empty)'}")
    args.user_counts = [int(x) for x in args.users.split(",") if x.strip()]
    if not args.user_counts or min(args.user_counts) < 1:
        ap.error("--users needs positive counts")
    if args.turns < 1 or min(args.history_tokens, args.question_tokens, args.answer_tokens) < 1:
        ap.error("--turns and the token counts must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wl = Workload(args.turns, args.system_tokens, args.history_tokens, args.question_tokens,
                  args.answer_tokens, args.think_time, args.rampup_per_user)
    slo = SLO(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_attainment)
    command = "python -m loadtests.goodput " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    work_dir = Path(args.guidellm_dir or tempfile.mkdtemp(prefix=f"factorkv-{args.name}-"))
    print(f"GuideLLM scenarios, logs and reports: {work_dir}", file=sys.stderr, flush=True)
    load0, t0 = os.getloadavg()[0], time.monotonic()
    runs = []
    if args.url:
        url = args.url.rstrip("/")
        info = get_json(f"{url}/factorkv/info", args.api_key)
        runs.append({**sweep(url, "server", info["model"], args, wl, slo, work_dir),
                     "model": info["model"]})
    else:
        from loadtests.server_process import running_server
        from model_patches.conversion.default_model import prepare_default_model

        tokenizer = str(prepare_default_model())
        common = ("--kv-cache-memory", args.kv_cache_memory, "--block-size", str(args.block_size),
                  "--max-model-len", str(wl.max_context() + 64), "--disable-uvicorn-access-log")
        for config in args.config_list:
            extra = tuple(args.kv_evict if a is None else a for a in CONFIGS[config])
            label = f"{config} {args.kv_evict}" if config.endswith("+evict") else config
            print(f"starting {label}", file=sys.stderr, flush=True)
            with running_server(*common, *extra) as srv:
                run = sweep(srv.base_url, label, tokenizer, args, wl, slo, work_dir)
                run["config"], run["model"] = config, srv.get_json("/factorkv/info")["model"]
                runs.append(run)
    meta = {**describe(wl, slo), "command": command, "load_average": (load0, os.getloadavg()[0]),
            "wall_s": time.monotonic() - t0, "kv_cache_memory": args.kv_cache_memory,
            "block_size": args.block_size}
    report = write_report(runs, meta, out, args.name)
    print(report.read_text())
    return 0 if all(p["failed"] == 0 for r in runs for p in r["points"]) else 1


if __name__ == "__main__":
    sys.exit(main())
