"""The benchmark's variants: which checkpoints to evaluate, and how each one is built.

A built-in variant name (``cal-r16``, ``served-r16``, ``merge-kv1-rec150-r16``, ...; see the
package docstring) parses into the converter's arguments (:func:`parse_variant`);
:func:`resolve_variant` builds its checkpoint on first use under ``<work>/models/``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from model_patches.conversion.convert import convert
from model_patches.conversion.default_variants import DEFAULT_VARIANT, RECIPES, prepare_variant
from model_patches.evaluation.tasks import EvalError

DEFAULT_VARIANTS = ("original", "init-r32", "cal-r32", "init-r16", "cal-r16", "served-r16",
                    "init-r8", "cal-r8",
                    "latent-init-r32", "latent-init-r16", "latent-init-r8", "latent3-init-r16",
                    "merge-kv1", "merge-kv1-real", "merge-kv1-r32", "merge-kv1-rec")
VARIANT_NAMES = ("original, init-rR, cal-rR, latent[G]-init-rR, latent[G]-cal-rR, "
                 "served[-latent]-rR, "
                 "merge-kvN[-real][-rec[S]][-rR|-cal-rR], or NAME=PATH")


def parse_variant(name: str) -> dict | None:
    """The convert() arguments of a built-in variant name ({} for original), None if the name
    is not one: init-rR, cal-rR (thin keys), latent[G]-init-rR, latent[G]-cal-rR (latent keys,
    G latent groups, default 1), merge-kvN[-real][-rec[S]], merge-kvN[-real][-rec[S]]-rR,
    merge-kvN[-real][-rec[S]]-cal-rR (real: --merge-keys real, rec: --recover, recS:
    --recover --e2e-steps S)."""
    if name == "original":
        return {}
    parts, out = name.split("-"), {}
    if parts[0].startswith("latent"):
        groups = parts[0][len("latent"):]
        if groups and not groups.isdigit():
            return None
        out = {"keys": "latent", **({"latent_groups": int(groups)} if groups else {})}
        parts = parts[1:]
        if not parts or parts[0] not in ("init", "cal"):
            return None
    if parts[0] == "merge":
        if len(parts) < 2 or not parts[1].startswith("kv") or not parts[1][2:].isdigit():
            return None
        out["kv_heads"] = int(parts[1][2:])
        parts = parts[2:]
        if parts[:1] == ["real"]:
            out["merge_keys"], parts = "real", parts[1:]
        steps = parts[0][3:] if parts and parts[0].startswith("rec") else None
        if steps == "" or (steps or "").isdigit():
            # rec: --recover with its default settings; recS: then S end-to-end steps
            out["recover"], parts = ({"e2e_steps": int(steps)} if steps else {}), parts[1:]
        if not parts:
            return out
        if parts[0] in ("init", "cal"):         # merge-kv1-cal-r32 (merge-kv1-init-r32 = -r32)
            out["calibrate"], parts = parts[0] == "cal", parts[1:]
    elif parts[0] in ("init", "cal"):
        out["calibrate"], parts = parts[0] == "cal", parts[1:]
    elif parts[0] == "served":           # served-rR (thin artifact), served-latent-rR
        keys = parts.pop(1) if len(parts) == 3 and parts[1] == "latent" else None
        if len(parts) != 2 or not parts[1].startswith("r") or not parts[1][1:].isdigit():
            return None
        return {"served_rank": int(parts[1][1:]), **({"served_keys": keys} if keys else {})}
    else:
        return None
    if len(parts) != 1 or not parts[0].startswith("r") or not parts[0][1:].isdigit():
        return None
    out.setdefault("keys", "thin")
    out["key_rank"] = int(parts[0][1:])
    return out


def variant_priority(name: str) -> int:
    """Order of computation: original, calibrated, extra/merged, then init-only variants."""
    spec = parse_variant(name)
    if spec is None:
        return 2
    if not spec:
        return 0
    if spec.get("calibrate") or "recover" in spec or "served_rank" in spec:
        return 1
    return 2 if "kv_heads" in spec else 3


def merged_name(spec: dict) -> str:
    """The merge-only variant a merged-then-factored spec starts from (merge-kvN[-real][-recS])."""
    rec = spec.get("recover")
    return (f"merge-kv{spec['kv_heads']}" + ("-real" if spec.get("merge_keys") == "real" else "")
            + ("" if rec is None else f"-rec{rec.get('e2e_steps', '')}"))


def served_builds(variants: list[str]) -> list[str]:
    """One line per shipped build in the report (served-[latent-]rR): which `--variant` of
    `factorkv serve` it is, whether it is the default, and the recipe that regenerates it."""
    lines = []
    for name in variants:
        spec = parse_variant(name) or {}
        if "served_rank" not in spec:
            continue
        v = f"{spec.get('served_keys', 'thin')}-r{spec['served_rank']}"
        role = "the default build" if v == DEFAULT_VARIANT else "a shipped build"
        recipe = ", ".join(f"{k} {val}" for k, val in RECIPES.get(v, {}).items()) or "defaults"
        lines.append(f"- `{name}`: {role} (`factorkv serve --variant {v}`), the artifact "
                     f"`make artifact VARIANT={v}` regenerates (calibration: {recipe}).")
    return lines + [""] if lines else []


def resolve_variant(name: str, root: Path, src: Path, extra: dict[str, Path],
                    progress: bool = True) -> Path:
    """Checkpoint dir of a variant; built-in ones (parse_variant) are converted on first use."""
    if name in extra:
        return extra[name]
    if name == "original":
        return src
    spec = parse_variant(name)
    if spec is None:
        raise EvalError(f"unknown variant {name!r} ({VARIANT_NAMES})")
    if "served_rank" in spec:
        return prepare_variant(f"{spec.get('served_keys', 'thin')}-r{spec['served_rank']}",
                               quiet=not progress)
    path = root / "models" / name
    if not (path / "config.json").exists():
        if "kv_heads" in spec and "key_rank" in spec:
            # merged, then factored: factor the merged variant (built on first use and cached),
            # which is what `convert --kv-heads N --key-rank R` does in a temp dir
            src = resolve_variant(merged_name(spec), root, src, extra, progress)
            spec = {k: v for k, v in spec.items()
                    if k in ("key_rank", "calibrate", "keys", "latent_groups")}
        t0 = time.time()
        print(f"[eval] building {name}: factorkv convert {src} {path}{_cli_flags(spec)}",
              file=sys.stderr, flush=True)
        convert(src, path, progress=progress, force=True, **spec)
        print(f"[eval] built {name} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def _cli_flags(spec: dict) -> str:
    """convert() arguments as `factorkv convert` flags (recover={"e2e_steps": S} ->
    --recover --e2e-steps S)."""
    flat = {}
    for k, v in spec.items():
        if isinstance(v, dict):
            flat[k] = True
            flat.update(v)
        elif v is not False:
            flat[k] = v
    return "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                   for k, v in flat.items())
