"""Per-checkpoint result cache of the benchmarks (quality, eviction quality).

``Results(root, name, ckpt)`` is ``<root>/results/<name>.json``: {"fingerprint", "metrics":
{key: value}}. The fingerprint is the checkpoint's config.json and its weight files' names,
sizes and mtimes; a new checkpoint resets the metrics, so a re-run only computes what is
missing for the checkpoint it has.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def checkpoint_fingerprint(ckpt: Path) -> str:
    """Short hash of a checkpoint directory's config.json and *.safetensors (name, size, mtime)."""
    h = hashlib.sha256((ckpt / "config.json").read_bytes())
    for f in sorted(ckpt.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class Results:
    """results/<name>.json: {"fingerprint", "metrics": {key: value}} (reset on a new
    checkpoint); every put is written atomically."""

    def __init__(self, root: Path, name: str, ckpt: Path):
        self.path = root / "results" / f"{name}.json"
        self.fp = checkpoint_fingerprint(ckpt)
        data = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
        self.metrics = data.get("metrics", {}) if data.get("fingerprint") == self.fp else {}

    def get(self, key):
        return self.metrics.get(key)

    def put(self, key, value) -> None:
        self.metrics[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fp, "metrics": self.metrics}, indent=1))
        os.replace(tmp, self.path)
