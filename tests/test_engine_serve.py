"""`factorkv serve --model <factored checkpoint>` over HTTP, and the capacity it reports."""

from __future__ import annotations

import subprocess
import sys

import pytest

from model_patches.conversion.checkpoint_writer import write_full_rank, write_rotary_pair_subset
from tests._server import running_server
from tests.conftest import DEFAULT_SERVER_ARGS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_thin(default_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    return {"full": write_full_rank(default_model_dir, root / "full-rank"),
            "r16": write_rotary_pair_subset(default_model_dir, root / "thin-r16", 16)}


def test_serve_full_rank_factored_checkpoint_answers_chat(default_thin, original_server):
    with running_server("--model", str(default_thin["full"]), *DEFAULT_SERVER_ARGS) as srv:
        info = srv.get_json("/factorkv/info")
        assert info["architectures"] == ["FactoredLlamaForCausalLM"]
        client = srv.openai_client()
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model, temperature=0, max_tokens=24,
            messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert "Paris" in chat.choices[0].message.content
        # r = D: same page size as the original model -> same capacity
        base = original_server.get_json("/factorkv/info")["kv_cache"]
        assert info["kv_cache"]["num_blocks"] == base["num_blocks"]


def test_serve_thin_checkpoint_has_1_6x_capacity(default_thin, original_server):
    with running_server("--model", str(default_thin["r16"]), *DEFAULT_SERVER_ARGS) as srv:
        client = srv.openai_client()
        model = client.models.list().data[0].id
        chat = client.chat.completions.create(
            model=model, temperature=0, max_tokens=8,
            messages=[{"role": "user", "content": "Hello!"}])
        assert chat.choices[0].finish_reason in ("stop", "length")
        assert chat.usage.completion_tokens >= 1
        thin = srv.get_json("/factorkv/info")["kv_cache"]
    base = original_server.get_json("/factorkv/info")["kv_cache"]
    assert thin["memory_bytes"] == base["memory_bytes"]
    # 2D / (r + D) = 128 / 80 = 1.6, within one block
    assert abs(thin["num_blocks"] - base["num_blocks"] * 1.6) <= 1


def test_serve_rejects_inconsistent_factored_checkpoint(default_thin, tmp_path):
    import json
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(default_thin["r16"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["factored_keys"]["key_rank"] = 32               # weights are still r = 16
    cfg["factored_keys"]["rotary_inv_freq"] = [0.5] * 16
    (bad / "config.json").write_text(json.dumps(cfg))
    proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--model", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "q_proj.weight" in lines[0] and "key_rank" in lines[0] and "Traceback" not in proc.stderr
