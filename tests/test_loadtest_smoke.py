"""The concurrency load tool against a live server: a few users, a few seconds, a report."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.engine_utils import ROOT

pytestmark = pytest.mark.slow


def test_concurrency_tool_smoke(default_server, tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "loadtests.concurrency", "--url", default_server.base_url,
         "--users", "1,3", "--requests-per-user", "1", "--context", "256",
         "--output-tokens", "48", "--sample-period", "0.05", "--max-duration", "60",
         "--request-timeout", "120",
         "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "concurrency.json").read_text())
    (run,) = data["runs"]
    assert [p["users"] for p in run["points"]] == [1, 3]
    for p in run["points"]:
        assert p["failed"] == 0 and p["requests"] == p["users"]
        assert p["output_tokens"] == 48 * p["users"] and p["output_tok_s"] > 0
        assert p["ttft_p50"] > 0 and p["tpot_p50"] > 0
        assert 100 < p["mean_prompt_tokens"] <= 256 - 48
    assert run["points"][1]["peak_running"] >= 1     # sampled every 0.05 s while 3 requests decode 48 tokens
    assert run["kv"]["capacity_tokens"] > 0
    report = (out / "concurrency.md").read_text()
    assert "| server | 3 | 3 | 0 |" in report
    for png in ("concurrency_running.png", "concurrency_throughput.png", "concurrency_latency.png"):
        assert (out / png).stat().st_size > 1000
    assert "N=3" in proc.stderr          # progress is shown while it runs


def test_latent_decode_ceiling_arithmetic():
    """The decode benchmark's ceiling for latent keys on the default model's shape (30 layers,
    9/3 heads, D 64, r 16): 0.52x at context 512, 0.27x at 2048 (issue 17's arithmetic)."""
    from loadtests.decode_throughput import ceiling

    cfg = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "hidden_size": 576, "intermediate_size": 1536, "vocab_size": 49152}
    for ctx, want in ((512, 0.52), (2048, 0.27)):
        m, a, r = ceiling(cfg, 16, ctx)
        assert r == 30 * ctx * 3 * 64 * 48 and a == 30 * ctx * 9 * 128
        assert abs((m + a) / (m + a + r) - want) < 0.01
    m, a, r = ceiling(cfg, 16, 2048, groups=3)           # one latent per KV head: r_g = r
    assert r == 30 * 2048 * 3 * 64 * 16


def test_decode_report_tables(tmp_path, default_model_dir):
    """The decode benchmark's report from recorded runs: one row per point, the latent forms
    against their ceilings (joint and per-head latents have different ceilings)."""
    import argparse

    from loadtests.decode_throughput import write_report

    names = ["baseline", "thin", "latent", "latent-per-head"]
    tok_s = {"baseline": 10.0, "thin": 9.0, "latent": 4.0, "latent-per-head": 6.0}
    runs = {n: [{"num_gpu_blocks": 100, "block_size": 128, "results": [
        {"batch": b, "context": c, "decode_tok_s": tok_s[n] * b} for b in (1, 8)
        for c in (512,)]}] for n in names}
    models = {n: default_model_dir for n in names}
    args = argparse.Namespace(rank=16, keys="thin,latent,latent-per-head", batches="1,8",
                              contexts="512", new_tokens=8, kv_cache_memory="1GiB", repeats=1,
                              out=str(tmp_path / "engine.md"))
    write_report(args, models, runs, [1, 8], [512], (0.1, 0.2), "2")
    text = (tmp_path / "engine.md").read_text()
    assert "| 8 | 512 | 80.0 | 72.0 | 0.90x | 32.0 | 0.40x | 48.0 | 0.60x |" in text
    assert "| 1 | 512 | 0.40x | 0.52x | 77% | 0.60x | 0.76x | 79% |" in text
