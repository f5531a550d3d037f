"""Which cached tokens an L2-norm eviction keeps (the policy, shared by engine and reference).

Keys with a LOW L2 norm tend to receive HIGH attention (Devoto et al., arXiv 2406.11430).
For a request whose cache holds n tokens, per layer and per KV head:

    n_kept = n                                   if keep >= 1 or n <= sink + window
           = min(n, max(sink + window, ceil(keep * n)))   otherwise
    kept   = [0, sink)  ∪  the (n_kept - sink - window) middle tokens with the lowest ‖k‖₂
             ∪  [n - window, n)

returned in increasing position order. Heads may keep different tokens; every head keeps
the same count, so each head's kept tokens pack into the same slot range. RoPE is a
rotation, so the norm of a cached (rotated) key equals the norm of the unrotated key.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

DEFAULT_SINK = 4
DEFAULT_WINDOW = 64


class EvictionConfigError(ValueError):
    """A bad eviction setting (the message is one line, meant for the user)."""


@dataclass(frozen=True)
class EvictionPolicy:
    keep: float = 1.0
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, (int, float)) and math.isfinite(self.keep)
                and 0.0 < self.keep <= 1.0):
            raise EvictionConfigError(f"kv-evict: keep must be in (0, 1], got {self.keep!r}")
        for name in ("sink", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise EvictionConfigError(f"kv-evict: {name} must be an integer >= 0, got {v!r}")

    @property
    def enabled(self) -> bool:
        return self.keep < 1.0

    @classmethod
    def parse(cls, spec: str) -> "EvictionPolicy":
        """'keep=0.5[,sink=4][,window=64]' (a bare number means keep)."""
        fields: dict[str, float | int] = {}
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, eq, value = part.partition("=")
            if not eq:
                name, value = "keep", name
            name = name.strip()
            if name not in ("keep", "sink", "window"):
                raise EvictionConfigError(
                    f"kv-evict: unknown field {name!r} (use keep=, sink=, window=)")
            try:
                if name == "keep":
                    fields["keep"] = float(value)
                else:
                    fields[name] = int(value)
            except ValueError:
                raise EvictionConfigError(
                    f"kv-evict: {name} needs a number, got {value.strip()!r}") from None
        if "keep" not in fields:
            raise EvictionConfigError(f"kv-evict: keep= is required, got {spec!r}")
        return cls(**fields)  # type: ignore[arg-type]

    def to_dict(self) -> dict:
        return asdict(self)

    def check_context(self, max_model_len: int) -> None:
        """Reject settings that can never evict anything within the model's context."""
        if self.enabled and self.sink + self.window >= max_model_len:
            raise EvictionConfigError(
                f"kv-evict: sink + window = {self.sink + self.window} must be smaller than "
                f"the context length {max_model_len}")

    def num_kept(self, n: int) -> int:
        if not self.enabled or n <= self.sink + self.window:
            return n
        # -1e-9: keep * n is a float product; 0.55 * 100 must keep 55, not 56
        return min(n, max(self.sink + self.window, math.ceil(self.keep * n - 1e-9)))

    def select(self, key_norms: torch.Tensor) -> torch.Tensor:
        """key_norms [H, n] -> kept positions [H, num_kept(n)] (int64, increasing per head)."""
        h, n = key_norms.shape
        k = self.num_kept(n)
        if k == n:
            return torch.arange(n).expand(h, n).clone()
        mid = key_norms[:, self.sink:n - self.window]
        chosen = mid.topk(k - self.sink - self.window, dim=1, largest=False).indices + self.sink
        head = torch.arange(self.sink).expand(h, -1)
        tail = torch.arange(n - self.window, n).expand(h, -1)
        return torch.cat([head, chosen.sort(dim=1).values, tail], dim=1)
