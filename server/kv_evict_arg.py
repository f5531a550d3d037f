"""User-facing eviction settings: `factorkv serve --kv-evict` and `vllm_xargs.kv_evict_keep`.

    --kv-evict keep=F[,sink=S][,window=W]      (a bare number means keep)

parses into the engine's policy (engine/eviction/policy.py, lowest L2 norm kept); bad input
raises :class:`EvictionConfigError` with a one-line message for the user.
"""

from __future__ import annotations

from engine.eviction.policy import EvictionConfigError, L2NormPolicy

FIELDS = ("keep", "sink", "window")


def parse_kv_evict(spec: str) -> L2NormPolicy:
    """'keep=0.5[,sink=4][,window=64]' (a bare number means keep) -> the policy."""
    fields: dict[str, float | int] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, eq, value = part.partition("=")
        if not eq:
            name, value = "keep", name
        name = name.strip()
        if name not in FIELDS:
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
    return L2NormPolicy(**fields)  # type: ignore[arg-type]


def check_request_keep(keep: object) -> None:
    """A request's ``kv_evict_keep`` (JSON value): a number in (0, 1], else EvictionConfigError."""
    if isinstance(keep, bool) or not isinstance(keep, (int, float)):
        raise EvictionConfigError(f"kv-evict: keep must be a number, got {keep!r}")
    L2NormPolicy(keep=float(keep))
