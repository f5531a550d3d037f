"""The benchmark's report: the markdown section between the quality markers of
docs/results/eviction.md (perplexity and retrieval tables, the issue's targets, the
variations against the policy) and the plot next to it."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from engine.eviction.policy import L2NormPolicy
from model_patches.evaluation.eviction_quality.settings import Setting

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
REPORT = Path(__file__).resolve().parents[3] / "docs" / "results" / "eviction.md"
PLOT = "eviction-quality.png"


TASK_NAMES = {"niah": "needle in a haystack", "passkey": "passkey"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _pts(x: float | None, base: float, flips: list[int] | None = None) -> str:
    if x is None:
        return "–"
    return f"{100 * (x - base):+.0f}" + (f" (−{flips[0]}/+{flips[1]})" if flips else "")


def targets(summary: dict, sink: int, window: int) -> list[str]:
    """The issue's targets, checked on the default-policy rows (both retrieval modes)."""
    lines = []
    ppl = summary["ppl"]
    s05 = Setting(L2NormPolicy(0.5, sink, window)).key
    if s05 in ppl:
        rel = ppl[s05] / ppl["none"] - 1
        lines.append(f"- perplexity, keep 0.5 within +1%: {rel:+.2%} — "
                     f"{'met' if rel <= 0.01 else 'missed'}")
    for task, keep in (("niah", 0.5), ("passkey", 0.1)):
        s = Setting(L2NormPolicy(keep, sink, window)).key
        for row in summary["retrieval"]:
            if row["task"] != task or f"context/{s}" not in row["acc"]:
                continue
            base = row["acc"]["none"]
            parts = []
            for mode in ("context", "engine"):
                d = 100 * (row["acc"][f"{mode}/{s}"] - base)
                parts.append(f"{mode} mode {d:+.0f} points ({'met' if d >= -2 else 'missed'})")
            lines.append(f"- {TASK_NAMES[task]} {row['length']}, keep {keep:g} within 2 points "
                         f"(n = {row['n']}): " + "; ".join(parts))
    main = sorted((Setting.from_dict(d) for d in summary["settings"]), key=lambda s: s.policy.keep)
    main = [s for s in main
            if s.skip_layers == 0 and s.order == "low" and s.select == "head"
            and (s.policy.sink, s.policy.window) == (sink, window)]
    for row in summary["retrieval"]:
        low = []
        for mode in ("context", "engine"):
            ok = [s.policy.keep for s in main
                  if row["acc"].get(f"{mode}/{s.key}", -1) >= row["acc"]["none"] - 0.02]
            low.append(f"{mode} mode {min(ok):g}" if ok else f"{mode} mode none of "
                       f"{', '.join(f'{s.policy.keep:g}' for s in main)}")
        lines.append(f"- {TASK_NAMES[row['task']]} {row['length']}: smallest keep within 2 "
                     "points: " + "; ".join(low))
    return lines


def variations(summary: dict, settings: list[Setting], sink: int, window: int) -> list[str]:
    """One line per --extra setting: its numbers next to the main policy's at the same keep."""
    lines = []
    for st in settings:
        ref = Setting(L2NormPolicy(st.policy.keep, sink, window))
        if st == ref or ref not in settings:
            continue
        ppl, parts = summary["ppl"], []
        if st.key in ppl:
            parts.append(f"perplexity {ppl[st.key] / ppl['none'] - 1:+.2%} (policy "
                         f"{ppl[ref.key] / ppl['none'] - 1:+.2%})")
        for row in summary["retrieval"]:
            got = [row["acc"].get(f"{m}/{st.key}") for m in ("context", "engine")]
            if None in got:
                continue
            want = [row["acc"][f"{m}/{ref.key}"] for m in ("context", "engine")]
            parts.append(f"{row['task']} {row['length']} context {_pct(got[0])} (policy "
                         f"{_pct(want[0])}), engine {_pct(got[1])} (policy {_pct(want[1])})")
        lines.append(f"- {st.label(sink, window)}: " + "; ".join(parts))
    return lines


def plot(path: Path, summary: dict, settings: list[Setting], opts: dict) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    main = sorted((s for s in settings if s.skip_layers == 0 and s.order == "low" and
                   s.select == "head" and (s.policy.sink, s.policy.window) == (opts["sink"], opts["window"])),
                  key=lambda s: -s.policy.keep)
    xs = [1.0] + [s.policy.keep for s in main]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ppl = summary["ppl"]
    ax[0].plot(xs, [0.0] + [100 * (ppl[s.key] / ppl["none"] - 1) for s in main], "o-")
    ax[0].axhline(1.0, color="gray", ls=":", label="target at keep 0.5: +1%")
    ax[0].set(xlabel="fraction of prompt KV kept", ylabel="perplexity change (%)",
              title=f"Perplexity, {summary['ppl_meta']['prompt']}-token evicted prompt")
    ax[0].invert_xaxis()
    ax[0].legend()
    for n, row in enumerate(summary["retrieval"]):
        for mode, ls in (("context", "-"), ("engine", "--")):
            ys = [row["acc"]["none"]] + [row["acc"][f"{mode}/{s.key}"] for s in main]
            ax[1].plot(xs, [100 * y for y in ys], "o" + ls, color=f"C{n}",
                       label=f"{row['task']} {row['length']} ({mode})")
    ax[1].set(xlabel="fraction of prompt KV kept", ylabel="exact match (%)", ylim=(-5, 105),
              title="Retrieval (greedy)")
    ax[1].invert_xaxis()
    ax[1].legend(fontsize=7)
    fig.suptitle(f"L2-norm eviction, SmolLM2-135M-Instruct (sink {opts['sink']}, "
                 f"window {opts['window']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_section(summary: dict, opts: dict, command: str, plot_name: str | None,
                   minutes: float) -> str:
    settings = [Setting.from_dict(d) for d in summary["settings"]]
    sink, window, n_layers = opts["sink"], opts["window"], summary["n_layers"]
    meta = summary["ppl_meta"]
    ppl = summary["ppl"]
    out = [BEGIN, "## Quality: perplexity and retrieval (plain torch, default model)", "",
           f"Command: `{command}` (`make bench-eviction-quality`)", "",
           f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} shared CPU cores "
           f"({platform.machine()}), {minutes:.0f} min of compute in the run(s) that filled the "
           "cache. SmolLM2-135M-Instruct (30 layers, 3 KV heads, head_dim 64), float32, "
           "`model_patches/evaluation/eviction_quality/`: the prompt is prefilled with full attention, "
           "then its KV cache is compacted per layer and KV head to `EvictionPolicy.select` "
           "(the lowest-‖k‖₂ middle tokens plus the first `sink` and last `window`), and later "
           "tokens run on the compacted cache at their logical positions — the engine's "
           "semantics, checked against `engine.torch_model` and transformers in "
           f"`tests/test_eviction_reference.py`. Policy: sink {sink}, window {window}.", "",
           "### Perplexity", "",
           f"Held-out Wikipedia text (`text_sets.token_stream(tok, 'evaluation')`), "
           f"{meta['windows']} sliding windows of {meta['ctx']} tokens at stride {meta['prompt']}: "
           f"the first {meta['prompt']} tokens of a window are the evicted prompt, the last "
           f"{meta['ctx'] - meta['prompt']} are scored teacher-forced on the evicted cache "
           f"({meta['scored']:,} scored tokens).", "",
           "| setting | prompt KV kept | PPL | Δ vs no eviction |", "|---|---:|---:|---:|",
           f"| no eviction | 100% | {ppl['none']:.3f} | – |"]
    for st in settings:
        if st.key in ppl:
            out.append(f"| {st.label(sink, window)} | "
                       f"{st.kept_fraction(meta['prompt'], n_layers):.1%} | {ppl[st.key]:.3f} | "
                       f"{ppl[st.key] / ppl['none'] - 1:+.2%} |")
    out += ["", "### Retrieval", "",
            "Greedy answers, exact match. *Needle in a haystack*: a held-out Wikipedia "
            "haystack (one per 10 prompts), the fact `<name>'s favourite <thing> is <value>.` "
            "(16 names, 6 things, 6 values each) after a random sentence end, then `Question: "
            "What is <name>'s favourite <thing>?\\nAnswer: <name>'s favourite <thing> is`; "
            "correct when the first word of the answer is the value. *Passkey*: "
            "`model_patches.evaluation.tasks.passkey_prompts` (repeated filler, 5-digit key at a random "
            "depth), `extract_passkey`.", "",
            "Two modes. **context**: the evicted prompt is everything before the question; the "
            "question is fed afterwards on the evicted cache, so every answer token depends on "
            "what was kept (the stricter test; the kvpress / paper setting). **engine**: the "
            "whole prompt, question included, is evicted after its prefill (what `factorkv "
            "serve --kv-evict` does to one request): the first answer token comes from the "
            "prefill, only the following ones see the evicted cache. Δ: accuracy change in "
            "points (prompts lost / gained against no eviction, same prompts); one prompt is "
            f"{100 / max((r['n'] for r in summary['retrieval']), default=1):.0f} points, so a "
            "2-point target is at the resolution of the sample.", "",
            "| task | length | n | setting | prompt KV kept | context mode | Δ (points) | "
            "engine mode | Δ (points) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in summary["retrieval"]:
        b = row["acc"]["none"]
        out.append(f"| {TASK_NAMES[row['task']]} | {row['length']} | {row['n']} | no eviction | "
                   f"100% | {_pct(b)} | – | {_pct(b)} | – |")
        for st in settings:
            kc, ke = f"context/{st.key}", f"engine/{st.key}"
            c, e = row["acc"].get(kc), row["acc"].get(ke)
            if c is None and e is None:
                continue
            out.append(f"| | | | {st.label(sink, window)} | "
                       f"≈{st.kept_fraction(row['length'], n_layers):.0%} | "
                       f"{_pct(c)} | {_pts(c, b, row['flips'].get(kc))} | "
                       f"{_pct(e)} | {_pts(e, b, row['flips'].get(ke))} |")
    out += ["", "### Targets (issue 9)", ""] + targets(summary, sink, window)
    var = variations(summary, settings, sink, window)
    if var:
        out += ["", "### Variations and controls (keep fixed, against the policy)", "",
                "Not engine options: measured to see whether the policy's choices matter here.",
                ""] + var
    if plot_name:
        out += ["", f"![eviction quality]({plot_name})"]
    out += ["", "Per-item results are cached in `~/.cache/factorkv/eviction/results/eviction.json` "
            "(keyed by task, item, setting and the checkpoint's fingerprint); a re-run only "
            "computes what is missing and rewrites this section.", END]
    return "\n".join(out)


def write_report(path: Path, section: str) -> None:
    """Replace the text between the quality markers of ``path`` (create the file if needed)."""
    text = path.read_text() if path.exists() else \
        "# L2-norm KV eviction: results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
