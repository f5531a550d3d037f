"""Shared pytest fixtures.

* ``default_model_dir`` (session): the prepared default model (SmolLM2-135M-Instruct,
  float32 HF directory) under $FACTORKV_CACHE_DIR (default ~/.cache/factorkv).
* ``default_variant_dir`` (session): the build of it that `factorkv serve` serves by
  default (calibrated factored keys, model_patches.conversion.default_variants).
* ``default_server`` (session): one `factorkv serve` process with the default model
  (no --model: the README path, i.e. the default variant), 256 MiB KV cache,
  max-model-len 2048; a
  :class:`tests._server.ServerProcess` (``.openai_base_url``, ``.get()``, ``.post()``,
  ``.openai_client()``, ``.log_tail()``).
* ``openai_client`` (session): an ``openai.OpenAI`` client for ``default_server``.
* ``original_server`` (session): the same with ``--variant original`` (the unmodified model).

To serve another checkpoint in a test, use ``tests._server.running_server(...)``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# Tests only talk to 127.0.0.1: never reach a model hub or usage-stats endpoint.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_SERVED_NAME = "SmolLM2-135M-Instruct"
DEFAULT_SERVER_ARGS = ("--kv-cache-memory", "256MiB", "--max-model-len", "2048",
                       "--disable-uvicorn-access-log")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """Prepare (once per machine) and return the default model directory."""
    from model_patches.conversion.default_model import prepare_default_model

    return prepare_default_model(quiet=True)


@pytest.fixture(scope="session")
def default_variant_dir(default_model_dir) -> Path:
    """The default build `factorkv serve` serves (built once from the shipped artifact)."""
    from model_patches.conversion.default_variants import DEFAULT_VARIANT, prepare_variant

    return prepare_variant(DEFAULT_VARIANT, default_model_dir.parent.parent, quiet=True)


def _session_server(cache_root: Path, log_dir: Path, *extra: str):
    from tests._server import ServerProcess

    srv = ServerProcess((*extra, *DEFAULT_SERVER_ARGS), env={"FACTORKV_CACHE_DIR": str(cache_root)},
                        log_dir=log_dir)
    srv.start()
    return srv


@pytest.fixture(scope="session")
def default_server(default_model_dir, default_variant_dir, tmp_path_factory):
    """A shared `factorkv serve` with the default model (started once per session)."""
    srv = _session_server(default_model_dir.parent.parent,
                          tmp_path_factory.mktemp("default-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def original_server(default_model_dir, tmp_path_factory):
    """A shared `factorkv serve --variant original` (the unmodified default model)."""
    srv = _session_server(default_model_dir.parent.parent,
                          tmp_path_factory.mktemp("original-server"), "--variant", "original")
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def openai_client(default_server):
    return default_server.openai_client()
