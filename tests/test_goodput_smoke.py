"""The multi-turn goodput benchmark end to end at a tiny size: 2 users, 2 turns, driven by
GuideLLM against the shared default server; the report has every column."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtests.goodput_report import COLUMNS
from tests.engine_utils import ROOT

pytestmark = pytest.mark.slow


def test_goodput_benchmark_smoke(default_server, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.goodput", "--url", default_server.base_url,
         "--users", "2", "--turns", "2", "--system-tokens", "32", "--history-tokens", "64",
         "--question-tokens", "16", "--answer-tokens", "8", "--think-time", "0.5",
         "--rampup-per-user", "0.5", "--max-duration", "240", "--out", str(out), "--name", "gp",
         "--guidellm-dir", str(tmp_path / "guidellm")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    data = json.loads((out / "gp.json").read_text())
    assert data["workload"]["turns"] == 2 and data["slo"]["ttft_ms"] > 0
    (run,) = data["runs"]
    (p,) = run["points"]
    assert p["users"] == 2 and p["conversations"] == 2
    assert p["requests"] == 4 and p["failed"] == 0 and p["cut"] == 0
    assert p["output_tokens"] == 4 * 8                      # answers of exactly --answer-tokens
    assert p["ttft_p50"] > 0 and p["tpot_p50"] > 0 and p["followup_ttft_p50"] > 0
    assert p["prefix_hit_rate"] is not None and 0 <= p["prefix_hit_rate"] <= 1
    assert p["preemptions"] == 0 and p["prefilled_tokens"] > 0
    assert 0 <= p["attainment"] <= 1 and p["goodput"] >= 0
    assert run["kv"]["capacity_tokens"] > 0

    # GuideLLM's own report: each second turn resends the first turn and its answer
    bench = json.loads((tmp_path / "guidellm" / "server" / "guidellm-2.json").read_text())
    by_conv: dict[str, dict[int, int]] = {}
    for r in bench["benchmarks"][0]["requests"]["successful"]:
        by_conv.setdefault(r["info"]["conversation_id"], {})[r["info"]["turn_index"]] = r["prompt_tokens"]
    assert len(by_conv) == 2
    for turns in by_conv.values():
        assert turns[1] > turns[0] + 8 + 16 - 1

    report = (out / "gp.md").read_text()
    header = next(line for line in report.splitlines() if line.startswith("| config | users |"))
    assert [c.strip() for c in header.strip("|").split("|")] == list(COLUMNS)
    assert "| server | 2 | 4 | 0 | 0 |" in report
    assert "largest N meeting the SLO" in report
    for png in ("gp_goodput.png", "gp_ttft.png", "gp_hit_rate.png"):
        assert (out / png).stat().st_size > 1000
    assert "server N=2" in proc.stderr          # progress is shown while it runs
