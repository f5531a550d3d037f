"""Which cached tokens an eviction keeps: one small class per scoring method, one shared select.

A policy scores each cached token from its key (``score``: the LOWER the score, the more the
token is worth keeping); the shared :meth:`EvictionPolicy.select` then keeps, for a request
whose cache holds n tokens, per layer and per KV head:

    n_kept = n                                   if keep >= 1 or n <= sink + window
           = min(n, max(sink + window, ceil(keep * n)))   otherwise
    kept   = [0, sink)  ∪  the (n_kept - sink - window) middle tokens with the lowest score
             ∪  [n - window, n)

returned in increasing position order. Heads may keep different tokens; every head keeps
the same count, so each head's kept tokens pack into the same slot range. Latent keys
(RoPE-exact, docs/methods.md) select per layer instead: one set of tokens for all heads,
scored on the concatenated pre-RoPE keys (:meth:`EvictionPolicy.select_per_layer`).

Policies (``POLICIES``, by name):

* ``low``    :class:`L2NormPolicy`, the engine's: keys with a LOW L2 norm tend to receive
  HIGH attention (Devoto et al., arXiv 2406.11430), so score = ‖k‖₂. RoPE is a rotation, so
  the norm of a cached (rotated) key equals the norm of the unrotated key;
* ``high``   :class:`HighNormPolicy`, a control: the highest-norm tokens kept;
* ``random`` :class:`RandomPolicy`, a control: uniform scores seeded by the layer index
  (deterministic).

The engine (compaction.py), the plain-torch reference (:meth:`EvictionPolicy.keep_mask`) and
the quality benchmark all ask a policy; adding one is a subclass with a ``score``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import ClassVar

import torch

DEFAULT_SINK = 4
DEFAULT_WINDOW = 64


class EvictionConfigError(ValueError):
    """A bad eviction setting (the message is one line, meant for the user)."""


@dataclass(frozen=True)
class EvictionPolicy:
    """Base: keep fraction, sink and window, and the shared selection; subclasses score."""

    keep: float = 1.0
    sink: int = DEFAULT_SINK
    window: int = DEFAULT_WINDOW

    name: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not (isinstance(self.keep, (int, float)) and math.isfinite(self.keep)
                and 0.0 < self.keep <= 1.0):
            raise EvictionConfigError(f"kv-evict: keep must be in (0, 1], got {self.keep!r}")
        for name in ("sink", "window"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise EvictionConfigError(f"kv-evict: {name} must be an integer >= 0, got {v!r}")

    def score(self, keys: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Keys [..., T, dim] as cached (after RoPE) -> scores [..., T]; lower = kept first.
        ``layer``: the index of the attention layer the keys belong to."""
        raise NotImplementedError

    @property
    def enabled(self) -> bool:
        return self.keep < 1.0

    def to_dict(self) -> dict:
        """keep, sink, window (the class is not included: the engine serves L2NormPolicy)."""
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

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [H, n] (``score``) -> kept positions [H, num_kept(n)] (int64, increasing per
        head): the sink, the window and the lowest-scored middle tokens."""
        h, n = scores.shape
        k = self.num_kept(n)
        if k == n:
            return torch.arange(n).expand(h, n).clone()
        mid = scores[:, self.sink:n - self.window]
        chosen = mid.topk(k - self.sink - self.window, dim=1, largest=False).indices + self.sink
        head = torch.arange(self.sink).expand(h, -1)
        tail = torch.arange(n - self.window, n).expand(h, -1)
        return torch.cat([head, chosen.sort(dim=1).values, tail], dim=1)

    def select_per_layer(self, keys: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Keys [H_kv, n, dim] -> kept positions [num_kept(n)], one selection for all heads,
        scored on each token's keys of all heads as one vector [H_kv·dim] (for L2NormPolicy
        the norm of the concatenation). Latent keys need it: every head of a joint latent
        reads every kept token."""
        h, n, _ = keys.shape
        return self.select(self.score(keys.transpose(0, 1).reshape(1, n, -1), layer))[0]

    def keep_mask(self, keys: torch.Tensor, prompt_len: int, layer: int = 0,
                  per_layer: bool = False) -> torch.Tensor:
        """Keys [T, H_kv, r] (as cached) -> bool [H_kv, T]: True at the selection among the
        first ``prompt_len`` tokens and at every j >= prompt_len (never evicted). per_layer:
        one selection for all heads (:meth:`select_per_layer`)."""
        t, h_kv, _ = keys.shape
        keep = torch.zeros(h_kv, t, dtype=torch.bool)
        keep[:, prompt_len:] = True
        if per_layer:
            sel = self.select_per_layer(keys[:prompt_len].transpose(0, 1), layer)
            keep[:, sel] = True
            return keep
        scores = self.score(keys[:prompt_len], layer).T                # [H_kv, L]
        keep.scatter_(1, self.select(scores), True)
        return keep


@dataclass(frozen=True)
class L2NormPolicy(EvictionPolicy):
    """The lowest-‖k‖₂ tokens are kept (the engine's policy)."""

    name: ClassVar[str] = "low"

    def score(self, keys: torch.Tensor, layer: int = 0) -> torch.Tensor:
        return keys.float().norm(dim=-1)


@dataclass(frozen=True)
class HighNormPolicy(EvictionPolicy):
    """Control: the highest-‖k‖₂ tokens are kept."""

    name: ClassVar[str] = "high"

    def score(self, keys: torch.Tensor, layer: int = 0) -> torch.Tensor:
        return -keys.float().norm(dim=-1)


@dataclass(frozen=True)
class RandomPolicy(EvictionPolicy):
    """Control: uniformly random tokens are kept (seeded by the layer index)."""

    name: ClassVar[str] = "random"

    def score(self, keys: torch.Tensor, layer: int = 0) -> torch.Tensor:
        return torch.rand(keys.shape[:-1], generator=torch.Generator().manual_seed(layer))


POLICIES: dict[str, type[EvictionPolicy]] = {
    p.name: p for p in (L2NormPolicy, HighNormPolicy, RandomPolicy)}
