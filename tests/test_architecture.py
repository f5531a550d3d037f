"""The layering contract of docs/architecture.md, enforced.

* `lint-imports` (import-linter; contracts in pyproject.toml): loadtests > server >
  model_patches > engine, evaluation > conversion > text_sets inside model_patches, no import
  cycles inside any package. It must pass here and fail on a copy with one forbidden import.
* no private name (``_x``) is imported from another module of the project;
* no module is longer than LINE_LIMIT lines unless LONG_MODULES says why.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "model_patches", "server", "loadtests")
LINT = str(Path(sys.executable).with_name("lint-imports"))
LINE_LIMIT = 330
# module -> why it is longer than LINE_LIMIT
LONG_MODULES: dict[str, str] = {
    "server/guards.py": "one ASGI middleware with one per-request contract (access, body size, "
                        "bad JSON, overload, drain, error shape) that reads top to bottom",
    "engine/torch_model.py": "the one plain-torch attention model (full, thin and latent keys, "
                             "KV cache, eviction masks, attention probabilities) that every "
                             "reference, calibration and evaluation shares",
}


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py"))


def _lint(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, "--no-cache"], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_import_contracts_hold():
    proc = _lint(ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "3 kept, 0 broken" in proc.stdout


@pytest.mark.parametrize("module, bad_import, broken", [
    ("engine/rotary.py", "import server.sizes", "imports point downward only"),
    ("model_patches/conversion/thin_init.py", "import model_patches.evaluation.tasks",
     "evaluation > conversion"),
    ("engine/checkpoint.py", "import engine.rotary", "no import cycles"),
])
def test_import_contracts_catch_a_forbidden_import(tmp_path, module, bad_import, broken):
    """A copy of the packages with one bad import added: lint-imports names the contract."""
    for pkg in PACKAGES:
        shutil.copytree(ROOT / pkg, tmp_path / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path).returncode == 0            # the copy itself is clean
    target = tmp_path / module
    target.write_text(target.read_text() + f"\n{bad_import}  # noqa\n")
    proc = _lint(tmp_path)
    assert proc.returncode != 0
    assert broken in proc.stdout and "BROKEN" in proc.stdout


def test_no_private_names_imported_across_modules():
    bad = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.ImportFrom) and node.module
                    and node.module.split(".")[0] in PACKAGES):
                bad += [f"{path.relative_to(ROOT)}: from {node.module} import {a.name}"
                        for a in node.names if a.name.startswith("_")]
    assert not bad, "\n".join(bad)


def test_modules_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in _modules()
            if (n := len(p.read_text().splitlines())) > LINE_LIMIT}
    unexplained = {p: n for p, n in long.items() if p not in LONG_MODULES}
    assert not unexplained, f"modules over {LINE_LIMIT} lines without a reason: {unexplained}"
