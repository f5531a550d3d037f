"""A benchmark setting (a policy plus controls the engine does not have) and how it evicts a
dense KV cache. The tokens a setting keeps are chosen by its policy (engine/eviction/policy.py):
``order`` names the policy (``POLICIES``: 'low' = L2NormPolicy, the engine's; the controls
'high' and 'random')."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.eviction.policy import POLICIES, EvictionPolicy, L2NormPolicy

#: the --extra grammar: field -> type
FIELDS = {"keep": float, "sink": int, "window": int, "skip": int, "order": str, "select": str}
CONTROL_LABELS = {"random": "control: random tokens kept instead of lowest-norm",
                  "high": "control: highest-norm tokens kept"}
SELECT = ("head", "layer")


def evict_cache(cache: list, policy: EvictionPolicy, skip_layers: int = 0,
                per_layer: bool = False) -> list:
    """Compact a KV cache (per layer (k [B, H_kv, L, r], v [B, H_kv, L, D]), k after RoPE) to
    the positions ``policy.select(policy.score(k, layer))`` of each sequence, layer and KV head,
    in order. Every head keeps the same count, so the result is again a dense cache
    [B, H_kv, kept, ·]. ``skip_layers`` (a variation, not an engine option): the first N layers
    keep everything. ``per_layer``: one selection for all heads of a layer
    (``policy.select_per_layer``; what the engine does for latent keys)."""
    out = []
    for i, (k, v) in enumerate(cache):
        if i < skip_layers:
            out.append((k, v))
            continue
        if per_layer:
            sel = torch.stack([policy.select_per_layer(kb, i).expand(k.shape[1], -1)
                               for kb in k])                                # [B, H_kv, kept]
        else:
            scores = policy.score(k, layer=i)                                # [B, H_kv, L]
            sel = torch.stack([policy.select(sb) for sb in scores])         # [B, H_kv, kept]
        out.append((k.gather(2, sel[..., None].expand(-1, -1, -1, k.shape[-1])),
                    v.gather(2, sel[..., None].expand(-1, -1, -1, v.shape[-1]))))
    return out


@dataclass(frozen=True)
class Setting:
    """One eviction setting of the benchmark: a policy, plus a variation the engine does not
    implement: ``skip_layers`` (the first N layers keep their whole cache). ``order`` is the
    policy's name ('low', 'random', 'high'); the policy is rebuilt as that class, so
    ``Setting(L2NormPolicy(...), 0, "high")`` and ``Setting(HighNormPolicy(...))`` are equal."""
    policy: EvictionPolicy
    skip_layers: int = 0
    order: str = "low"
    select: str = "head"

    def __post_init__(self) -> None:
        if self.select not in SELECT:
            raise ValueError(f"select must be head or layer, got {self.select!r}")
        if self.order == "low" and self.policy.name in POLICIES:
            object.__setattr__(self, "order", self.policy.name)
        cls = POLICIES.get(self.order)
        if cls is None:
            raise ValueError(f"order must be low, random or high, got {self.order!r}")
        if type(self.policy) is not cls:
            object.__setattr__(self, "policy", cls(**self.policy.to_dict()))

    @property
    def key(self) -> str:
        """Result key, e.g. 'keep0.5-s4-w64', 'keep0.5-s4-w64-skip2', 'keep0.5-s4-w64-random'."""
        p = self.policy
        return f"keep{p.keep:g}-s{p.sink}-w{p.window}" + \
            (f"-skip{self.skip_layers}" if self.skip_layers else "") + \
            (f"-{self.order}" if self.order != "low" else "") + \
            ("-per-layer" if self.select == "layer" else "")

    def label(self, sink: int, window: int) -> str:
        p, extra = self.policy, []
        if (p.sink, p.window) != (sink, window):
            extra.append(f"sink {p.sink}, window {p.window}")
        if self.skip_layers:
            extra.append(f"layers 0-{self.skip_layers - 1} not evicted")
        if self.order != "low":
            extra.append(CONTROL_LABELS[self.order])
        if self.select == "layer":
            extra.append("one selection per layer, all heads")
        return f"keep {p.keep:g}" + (f" ({'; '.join(extra)})" if extra else "")

    def kept_fraction(self, n: int, n_layers: int) -> float:
        """Fraction of an n-token prompt's KV (all layers) that stays."""
        k = self.policy.num_kept(n)
        return (self.skip_layers * n + (n_layers - self.skip_layers) * k) / (n_layers * n)

    def evict(self, cache: list) -> list:
        if not self.policy.enabled:
            return cache
        return evict_cache(cache, self.policy, self.skip_layers, self.select == "layer")

    @classmethod
    def parse(cls, spec: str) -> "Setting":
        """'keep=F[,sink=S][,window=W][,skip=N][,order=low|random|high][,select=head|layer]'
        (a bare number: keep)."""
        given: dict = {}
        for part in (x.strip() for x in spec.split(",")):
            if not part:
                continue
            field, _, value = part.rpartition("=")
            field = field.strip() or "keep"
            if field not in FIELDS:
                raise ValueError(f"unknown field {field!r} in {spec!r} (use {'=, '.join(FIELDS)}=)")
            try:
                given[field] = FIELDS[field](value.strip())
            except ValueError:
                raise ValueError(f"{field} needs a number, got {value.strip()!r}") from None
        if "keep" not in given:
            raise ValueError(f"keep= is required, got {spec!r}")
        skip, order, select = given.pop("skip", 0), given.pop("order", "low"), \
            given.pop("select", "head")
        return cls(L2NormPolicy(**given), skip, order, select)

    def to_dict(self) -> dict:
        return {**self.policy.to_dict(), "skip_layers": self.skip_layers, "order": self.order,
                "select": self.select}

    @classmethod
    def from_dict(cls, d: dict) -> "Setting":
        d = dict(d)
        skip, order, select = d.pop("skip_layers", 0), d.pop("order", "low"), \
            d.pop("select", "head")
        return cls(L2NormPolicy(**d), skip, order, select)
