"""Interrupted and corrupt inputs for `factorkv convert` and `factorkv prepare`.

* SIGKILL a real `factorkv convert` of the default model while it computes and while it
  writes: the destination never exists, and what is left (a ``.<dst>.tmp-*`` sibling) is
  not something `factorkv serve` would take for a checkpoint.
* `factorkv prepare` from a truncated or garbage GGUF: one line ``factorkv: error: ...``
  naming the file (no traceback), exit 1, no model directory and no temp debris.
(Killed prepare and truncated convert sources are in test_foundation_prepare.py and
test_convert.py.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import model_patches.default_model as dm
from server.errors import CLIError
from server.model_check import check_model_dir
from tests._server import REPO

pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [extra.pop("PYTHONPATH", None), str(REPO)])), **extra}


@pytest.mark.parametrize("when", ["computing", "writing"])
def test_killed_convert_leaves_no_checkpoint(default_model_dir, tmp_path, when):
    dst = tmp_path / "smol-r32"
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "convert", str(default_model_dir),
                             str(dst), "--key-rank", "32", "--stat-tokens", "512", "-q"],
                            cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        if when == "computing":
            time.sleep(4.0)  # imports done, statistics/factorisation under way
        else:
            while not any((p / "model.safetensors").exists()
                          for p in tmp_path.glob(f".{dst.name}.tmp-*")):
                assert proc.poll() is None, "convert finished before it could be interrupted"
                assert time.monotonic() < deadline
                time.sleep(0.01)
        assert proc.poll() is None, "convert finished before it could be interrupted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert not dst.exists()
    debris = list(tmp_path.glob(f".{dst.name}*"))
    if when == "writing":
        assert debris, "expected the temp directory of the interrupted write"
    for d in debris:
        assert d.name.startswith(f".{dst.name}.tmp-")
        with pytest.raises(CLIError):
            check_model_dir(d)          # `factorkv serve --model <debris>` refuses it
    # and a re-run succeeds next to the debris
    if when == "writing":
        out = subprocess.run([sys.executable, "-m", "server.cli", "convert", str(default_model_dir),
                              str(dst), "--key-rank", "32", "--stat-tokens", "512", "-q"],
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        check_model_dir(dst)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_prepare_from_corrupt_gguf_is_one_line_error(tmp_path, damage):
    good = dm.find_gguf()
    pkg = tmp_path / "site" / dm.SOURCE_PACKAGE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    bad = pkg / dm.GGUF_FILE
    if damage == "truncated":
        with open(good, "rb") as f:
            bad.write_bytes(f.read(good.stat().st_size // 3))
    else:
        bad.write_bytes(b"GGUF" + os.urandom(1 << 20))
    cache = tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "prepare", "-q"], cwd=REPO,
                          env=_env(PYTHONPATH=str(tmp_path / "site"), FACTORKV_CACHE_DIR=str(cache)),
                          capture_output=True, text=True, timeout=300)
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("factorkv: error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and str(bad) in errors[0], errors
    assert "reinstall" in errors[0]
    models = cache / "models"
    assert not (models / dm.MODEL_NAME).exists()
    assert [p.name for p in models.iterdir() if not p.name.endswith(".lock")] == []
