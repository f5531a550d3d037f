"""Interrupted and corrupt inputs for `factorkv convert` and `factorkv prepare`.

* SIGKILL a real `factorkv convert` of the default model while it computes, and (fault
  injected) in the middle of writing the weights: the destination never exists, what is
  left (a ``.<dst>.tmp-*`` sibling) is not something `factorkv serve` takes for a
  checkpoint, and a re-run succeeds.
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

import model_patches.conversion.default_model as dm
from server.errors import CLIError
from server.model_check import check_model_dir
from tests._server import REPO

pytestmark = pytest.mark.slow


def _env(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [extra.pop("PYTHONPATH", None), str(REPO)])), **extra}


#: Runs `factorkv convert` with safetensors' save_file replaced by one that writes half of
#: the real file and then SIGKILLs its own process: a kill at the worst moment, every time.
KILL_MID_WRITE = """
import os, signal, sys
import model_patches.conversion.checkpoint_writer as fc
real_save = fc.save_file
def save_half_then_die(tensors, path, metadata=None):
    real_save(tensors, path, metadata=metadata)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
        f.flush()
        os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
fc.save_file = save_half_then_die
from server.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _convert_cmd(src, dst, killer: str | None = None) -> list[str]:
    args = ["convert", str(src), str(dst), "--key-rank", "32", "--stat-tokens", "512", "-q"]
    return [sys.executable, *(["-c", killer] if killer else ["-m", "server.cli"]), *args]


def _assert_no_checkpoint(dst, tmp_path) -> list:
    assert not dst.exists()
    debris = list(tmp_path.glob(f".{dst.name}*"))
    for d in debris:
        assert d.name.startswith(f".{dst.name}.tmp-")
        with pytest.raises(CLIError):
            check_model_dir(d)          # `factorkv serve --model <debris>` refuses it
    return debris


def test_convert_killed_while_computing(default_model_dir, tmp_path):
    dst = tmp_path / "smol-r32"
    proc = subprocess.Popen(_convert_cmd(default_model_dir, dst), cwd=REPO, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3.0)  # mid-run (the whole run takes ~11 s here)
        assert proc.poll() is None, "convert finished before it could be interrupted"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    _assert_no_checkpoint(dst, tmp_path)


def test_convert_killed_mid_write_then_rerun(default_model_dir, tmp_path):
    dst = tmp_path / "smol-r32"
    proc = subprocess.run(_convert_cmd(default_model_dir, dst, KILL_MID_WRITE), cwd=REPO,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    debris = _assert_no_checkpoint(dst, tmp_path)
    assert debris and any((d / "model.safetensors").exists() for d in debris)  # half-written
    out = subprocess.run(_convert_cmd(default_model_dir, dst), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=300)
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
