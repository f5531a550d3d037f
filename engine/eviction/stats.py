"""Eviction counters handed from vLLM's engine process to the API server through a small
JSON file (written atomically by the scheduler, read on each /metrics or /v1/kv-cache).

vLLM's SchedulerStats is a fixed msgspec-encoded structure with no field for plugins, so
a side file is the smallest channel that needs no change to vLLM.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def default_stats_path() -> str:
    """A per-server path (the API server's pid), on tmpfs when there is one."""
    root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else tempfile.gettempdir()
    return os.path.join(root, f"factorkv-evict-{os.getpid()}.json")


def write_stats(path: str | Path, stats: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(stats))
    os.replace(tmp, path)


def read_stats(path: str | Path | None) -> dict | None:
    """The last written stats, or None if there are none yet."""
    if not path:
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
