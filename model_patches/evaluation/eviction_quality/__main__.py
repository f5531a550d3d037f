"""The command line: ``python -m model_patches.evaluation.eviction_quality`` (package doc)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

import torch

import model_patches.evaluation.eviction_quality as package
from engine.eviction.policy import DEFAULT_SINK, DEFAULT_WINDOW
from model_patches.conversion.default_model import cache_root, default_model_dir
from model_patches.evaluation.eviction_quality.report import (PLOT, REPORT, plot, report_section,
                                                              write_report)
from model_patches.evaluation.eviction_quality.run import compute
from model_patches.evaluation.eviction_quality.settings import Setting


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m model_patches.evaluation.eviction_quality",
                                 description=package.__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(default_model_dir()), help="checkpoint (default: the "
                    "prepared default model)")
    ap.add_argument("--keeps", type=_floats, default=[0.5, 0.25, 0.1])
    ap.add_argument("--sink", type=int, default=DEFAULT_SINK)
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--extra", action="append", default=[],
                    metavar="keep=F[,sink=S,window=W,skip=N,order=O]",
                    help="an extra setting row (repeatable), e.g. another window; variations the "
                    "engine does not have: skip=N (the first N layers are not evicted), "
                    "order=random|high (controls: random or highest-norm tokens kept)")
    ap.add_argument("--extra-tasks", type=lambda x: x.split(","), default=["all"],
                    help="where --extra settings are computed: all, or a list of ppl, niah2048, "
                    "passkey4096, ...")
    ap.add_argument("--ppl-windows", type=int, default=24)
    ap.add_argument("--ppl-ctx", type=int, default=2048)
    ap.add_argument("--lengths", type=_ints, default=[2048, 4096])
    ap.add_argument("--niah-n", type=int, default=50)
    ap.add_argument("--passkey-n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(cache_root() / "eviction"))
    ap.add_argument("--out", default=str(REPORT))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores "
                    "not busy by the 1-min load average, at least 1; oversubscribed threads on a "
                    "shared machine are several times slower)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(a.threads or max(1, cores - int(os.getloadavg()[0] + 0.5)))
    opts = dict(vars(a), progress=not a.no_progress)
    command = "python -m model_patches.evaluation.eviction_quality " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    summary = compute(opts)
    out = Path(a.out)
    settings = [Setting.from_dict(d) for d in summary["settings"]]
    png = plot(out.parent / PLOT, summary, settings, opts)
    minutes = (summary["ppl_meta"]["seconds"] + sum(r["seconds"] for r in summary["retrieval"])) / 60
    write_report(out, report_section(summary, opts, command.strip(), png and png.name, minutes))
    (Path(a.work) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[eviction] wrote {out} in {time.time() - t0:.0f} s ({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
