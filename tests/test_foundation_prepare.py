"""`prepare_default_model`: a valid HF directory, idempotent, atomic."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import model_patches.conversion.default_model as dm

REPO = Path(__file__).resolve().parents[1]


def test_prepared_model_is_plain_float32_hf_dir(default_model_dir):
    cfg = json.loads((default_model_dir / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "generation_config.json").is_file()
    assert (default_model_dir / dm.MARKER).is_file()
    from safetensors import safe_open

    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        t = f.get_tensor("model.embed_tokens.weight")
    assert str(t.dtype) == "torch.float32" and tuple(t.shape) == (49152, 576)

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert "<|im_start|>user\nhi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")


def test_second_prepare_is_fast_noop(default_model_dir):
    marker = default_model_dir / dm.MARKER
    before = (marker.stat().st_mtime_ns, marker.read_text())
    t0 = time.monotonic()
    again = dm.prepare_default_model(default_model_dir.parent.parent, quiet=True)
    assert time.monotonic() - t0 < 2.0
    assert again == default_model_dir
    assert (marker.stat().st_mtime_ns, marker.read_text()) == before


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("FACTORKV_CACHE_DIR", str(tmp_path / "c"))
    assert dm.default_model_dir() == tmp_path / "c" / "models" / dm.MODEL_NAME
    monkeypatch.delenv("FACTORKV_CACHE_DIR")
    assert dm.default_model_dir() == Path.home() / ".cache" / "factorkv" / "models" / dm.MODEL_NAME


def _fake_build(gguf, out, progress):
    """A quick stand-in for the 20 s dequantisation (the atomic machinery is what is tested)."""
    (out / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    (out / "model.safetensors").write_bytes(b"fake")
    return ["config.json", "model.safetensors"]


def test_stale_temp_dir_is_not_a_model_and_is_cleaned(tmp_path, monkeypatch):
    models = tmp_path / "models"
    stale = models / f"{dm.TMP_PREFIX}dead"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{}")
    (stale / "model.safetensors").write_bytes(b"partial")
    final = models / dm.MODEL_NAME
    assert not dm.is_prepared(final, dm.find_gguf())

    monkeypatch.setattr(dm, "_build", _fake_build)
    out = dm.prepare_default_model(tmp_path, quiet=True)
    assert out == final and dm.is_prepared(final, dm.find_gguf())
    assert not stale.exists()
    assert sorted(p.name for p in models.iterdir() if not p.name.endswith(".lock")) == [dm.MODEL_NAME]
    assert oct(final.stat().st_mode & 0o077) != "0o0"  # not left 0700 like a mkdtemp dir


def test_incomplete_final_dir_is_replaced(tmp_path, monkeypatch):
    final = tmp_path / "models" / dm.MODEL_NAME
    final.mkdir(parents=True)
    (final / "config.json").write_text("{}")  # e.g. a half copy without the marker
    monkeypatch.setattr(dm, "_build", _fake_build)
    dm.prepare_default_model(tmp_path, quiet=True)
    assert (final / dm.MARKER).is_file() and (final / "model.safetensors").read_bytes() == b"fake"


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def boom(gguf, out, progress):
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(dm, "_build", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        dm.prepare_default_model(tmp_path, quiet=True)
    left = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_marker_mismatch_means_not_prepared(tmp_path, monkeypatch):
    monkeypatch.setattr(dm, "_build", _fake_build)
    final = dm.prepare_default_model(tmp_path, quiet=True)
    marker = json.loads((final / dm.MARKER).read_text())
    marker["source"]["size"] += 1  # a different GGUF than the one it was made from
    (final / dm.MARKER).write_text(json.dumps(marker))
    assert not dm.is_prepared(final, dm.find_gguf())


@pytest.mark.slow
def test_killed_prepare_leaves_no_model(tmp_path):
    """SIGKILL a real prepare mid-way: only a temp dir remains, never a valid-looking model."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "FACTORKV_CACHE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "prepare"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    models = tmp_path / "models"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list(models.glob(f"{dm.TMP_PREFIX}*")):
            assert proc.poll() is None, "prepare finished before it could be interrupted"
            time.sleep(0.05)
        time.sleep(1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    final = models / dm.MODEL_NAME
    assert not final.exists()
    assert not dm.is_prepared(final, dm.find_gguf())
    assert list(models.glob(f"{dm.TMP_PREFIX}*"))  # the debris is recognisably temporary
