"""Pieces every load-test report uses: number formatting, ratio sentences, the machine
line, line plots of a metric against offered users (one line per configuration) and the
plot links at the end of a Markdown page.

A *run* here is a dict with ``label`` and ``points`` (a list of dicts with ``users`` and
the plotted metrics), as the load tests write it to their JSON file.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path


def fmt(v: float | None, scale: float = 1.0) -> str:
    """``-`` for None; two decimals, or none once scaled (e.g. seconds -> ms)."""
    return "-" if v is None else f"{v * scale:.2f}" if scale == 1.0 else f"{v * scale:.0f}"


def ratio_text(label: str, num: float, den: float, spec: str, target: float | None,
               unit: str = "") -> str:
    """``label a / b = **r x** (target ≥ t x)``; n/a when the reference is 0."""
    if not den:
        return f"{label}: n/a (baseline {den:g})"
    return (f"{label} {num:{spec}} / {den:{spec}}{unit} = **{num / den:.2f}x**"
            + (f" (target ≥ {target}x)" if target else ""))


def machine_text(load: tuple[float, float]) -> str:
    return (f"Machine: {os.cpu_count()} CPU cores ({platform.machine()}), 1-minute load average "
            f"{load[0]:.2f} before, {load[1]:.2f} after.")


def kv_table(runs: list[dict], users_column: str = "users at context (engine)") -> list[str]:
    """Markdown: per run its model, KV bytes per token, budget, capacity and how many users of
    the benchmark's context fit (``run["kv"]`` is the server's ``GET /v1/kv-cache?context=``)."""
    lines = [f"| model | KV B/token | KV budget | KV capacity (tokens) | {users_column} |",
             "|---|---:|---:|---:|---:|"]
    for run in runs:
        kv = run["kv"]
        lines.append(f"| {run['label']} (`{Path(run['model']).name}`) | {kv['bytes_per_token']:,} | "
                     f"{(kv.get('budget_bytes') or kv['memory_bytes']) / 2**20:.0f} MiB | "
                     f"{kv['capacity_tokens']:,} | {kv['max_users_at_context']:.2f} |")
    return lines


def line_plot(path: Path, runs: list[dict], key: str, title: str, ylabel: str,
              scale: float = 1.0, decorate: Callable | None = None,
              xlabel: str = "offered concurrent users", legend: str = "upper left") -> Path:
    """``key`` of every point against ``users``, one line per run; ``decorate(ax, runs)``
    may draw more (a reference line, a second axis) before the legend. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for run in runs:
        xs = [p["users"] for p in run["points"]]
        ax.plot(xs, [(p[key] or 0) * scale for p in run["points"]], marker="o", label=run["label"])
    if decorate is not None:
        decorate(ax, runs)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_links(plots: list[Path]) -> list[str]:
    """Markdown: a line of links to the plots, then each plot inline."""
    lines = ["", "Plots: " + ", ".join(f"[{p.name}]({p.name})" for p in plots), ""]
    return lines + [f"![{p.stem}]({p.name})" for p in plots]
