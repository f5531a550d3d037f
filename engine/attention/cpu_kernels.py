"""The C++ decode kernels of the CPU backends (thin and latent keys), compiled on first use.

torch.utils.cpp_extension builds csrc/paged_decode.cpp once per machine (about a
minute on 2 cores; cached under $FACTORKV_CACHE_DIR/torch_extensions). If the build
is impossible (no compiler) the backends fall back to their pure-torch decode paths.
Set FACTORKV_CPU_KERNEL=0 to force the fallback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)
_SRC = Path(__file__).parent / "csrc" / "paged_decode.cpp"
_module = None
_failed = False


def build_dir() -> Path:
    root = Path(os.environ.get("FACTORKV_CACHE_DIR", Path.home() / ".cache" / "factorkv"))
    d = root / "torch_extensions" / "paged_decode"
    d.mkdir(parents=True, exist_ok=True)
    return d


def decode_kernels():
    """The compiled module (.thin_decode, .latent_decode), or None if unavailable."""
    global _module, _failed
    if _module is not None or _failed:
        return _module
    if os.environ.get("FACTORKV_CPU_KERNEL", "1") == "0":
        _failed = True
        return None
    try:
        from torch.utils.cpp_extension import load
        _module = load(name="factorkv_paged_decode", sources=[str(_SRC)],
                       extra_cflags=["-O3", "-march=native", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir()),
                       verbose=False)
    except Exception as e:  # noqa: BLE001 - any build failure -> torch fallback
        logger.warning("FactorKV C++ decode kernel unavailable (%s); using the torch path", e)
        _failed = True
    return _module
