"""The report of ``python -m loadtests.concurrency``: NAME.md (KV facts, one row per
(model, offered users), ratios to the first run), NAME.json and three plots."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.report import fmt, kv_table, line_plot, machine_text, plot_links, ratio_text


def write_report(runs: list[dict], args, out_dir: Path, command: str, load: tuple[float, float]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{args.name}.json").write_text(json.dumps(
        {"command": command, "runs": runs, "load_average": load}, indent=1))
    plots = plot(runs, out_dir, args.name)
    lines = ["# Concurrency under a fixed KV budget", "",
             f"Command: `{command}`", "",
             f"{machine_text(load)} Each user sends {args.requests_per_user} "
             f"streaming chat request(s) back to back: ~{args.context - args.output_tokens} prompt tokens "
             f"of Wikipedia text and exactly {args.output_tokens} output tokens (ignore_eos), "
             f"so each request holds up to {args.context} tokens of KV cache.", ""]
    lines += kv_table(runs)
    lines += ["", "| model | offered users | requests | failed | peak running | mean running | "
              "peak waiting | preemptions | output tok/s | saturated tok/s | TTFT p50 / p99 (s) | "
              "TPOT p50 / p99 (ms) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        for p in run["points"]:
            lines.append(
                f"| {run['label']} | {p['users']} | {p['requests']} | {p['failed']} | "
                f"{p['peak_running']:.0f} | {p['mean_running']:.1f} | {p['peak_waiting']:.0f} | "
                f"{p['preemptions']:.0f} | {p['output_tok_s']:.1f} | {fmt(p['saturated_tok_s'])} | "
                f"{fmt(p['ttft_p50'])} / {fmt(p['ttft_p99'])} | "
                f"{fmt(p['tpot_p50'], 1000)} / {fmt(p['tpot_p99'], 1000)} |")
    if len(runs) >= 2:
        lines += ratio_lines(runs)
    lines += plot_links(plots)
    report = out_dir / f"{args.name}.md"
    report.write_text("\n".join(lines) + "\n")
    return report


# Targets per configuration (issues 5 and 9): peak running requests and best output
# throughput, each as a ratio to the first (baseline) run.
RUNNING_TARGETS = {"factored": 1.55, "evict": 1.9, "factored+evict": 3.0}
THROUGHPUT_TARGETS = {"factored": 1.3}


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
            + ratio_text("peak concurrently running requests", pr, pr_b, ".0f", RUNNING_TARGETS.get(config))
            + "; " + ratio_text("best output throughput", tp, tp_b, ".1f",
                                THROUGHPUT_TARGETS.get(config), " tok/s"))
        sat = [(p, q) for p in base["points"] for q in run["points"] if p["users"] == q["users"]
               and p["saturated_tok_s"] and q["saturated_tok_s"]]
        lines += [f"  - generation tok/s while the baseline's cache was full and requests waited, "
                  f"N={p['users']}: {q['saturated_tok_s']:.1f} / {p['saturated_tok_s']:.1f} = "
                  f"{q['saturated_tok_s'] / p['saturated_tok_s']:.2f}x" for p, q in sat]
    failed = sum(p["failed"] for r in runs for p in r["points"])
    lines.append(f"- failed requests: {failed}")
    return lines


def _offered_diagonal(ax, runs: list[dict]) -> None:
    xs = sorted({p["users"] for r in runs for p in r["points"]})
    ax.plot(xs, xs, color="grey", linestyle=":", label="offered")


def _tpot_axis(ax, runs: list[dict]) -> None:
    ax2 = ax.twinx()
    for run in runs:
        ax2.plot([p["users"] for p in run["points"]],
                 [(p["tpot_p50"] or 0) * 1000 for p in run["points"]], linestyle="--",
                 marker="x", label=f"{run['label']} TPOT")
    ax2.set_ylabel("TPOT p50 (ms, dashed)")


def plot(runs: list[dict], out_dir: Path, name: str = "concurrency") -> list[Path]:
    return [
        line_plot(out_dir / f"{name}_running.png", runs, "peak_running",
                  "Concurrently running requests", "peak running requests",
                  decorate=_offered_diagonal),
        line_plot(out_dir / f"{name}_throughput.png", runs, "output_tok_s", "Output throughput",
                  "output tokens/s"),
        line_plot(out_dir / f"{name}_latency.png", runs, "ttft_p50", "Latency (p50)",
                  "TTFT p50 (s)", decorate=_tpot_axis),
    ]
