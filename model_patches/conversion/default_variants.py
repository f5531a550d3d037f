"""Calibrated factored variants of the default model, built in seconds from the prepared
model plus a small artifact kept in the repository.

Calibration takes minutes of CPU, so its result for the default model ships with the
project: ``model_patches/artifacts/SmolLM2-135M-Instruct-thin-r<R>.safetensors`` holds only
the calibrated thin projections (``q_proj``/``k_proj`` of every layer, float16: H·r + H_kv·r
rows of `hidden` per layer, ~6.6 MB at r = 16) and ``....json`` its manifest: the file's
sha256, the checkpoint's ``factored_keys`` block (rank, rotary table, method, calibration
report) and the command that regenerates it. :func:`prepare_variant` checks the hash, swaps
the thin weights into the prepared original and writes the checkpoint atomically under

    $FACTORKV_CACHE_DIR/models/SmolLM2-135M-Instruct-thin-r<R>-cal

with a marker recording the artifact's hash (a second call only reads the marker).
Regenerate an artifact (the calibration with RECIPES[r], then the export) with
``make artifact RANK=16`` (= ``python -m model_patches.conversion.default_variants regenerate 16``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from engine.checkpoint import BLOCK, LLAMA_ARCH, FactoredKeysConfig, validate_checkpoint_dir
from model_patches.conversion.checkpoint_writer import write_checkpoint
from model_patches.conversion.convert import convert
from model_patches.conversion.default_model import (MODEL_NAME, DefaultModelError,
                                                    default_model_dir, file_lock,
                                                    prepare_default_model, sha256_file)

ARTIFACT_DIR = Path(__file__).resolve().parent.parent / "artifacts"
DEFAULT_VARIANT = "thin-r16"
ORIGINAL = "original"
MARKER = "factorkv-variant.json"
# The calibration recipe of each shipped artifact (model_patches.conversion.calibrate settings).
# r = 16: layer-wise on 256 windows of 256 tokens (half chat-formatted), 300 Adam steps of
# 16 windows per layer, then 60 end-to-end KL steps (~30 min on 2 CPU cores).
# r = 32: the converter's default `--calibrate` (64 windows, 150 steps of 8; ~6 min).
RECIPES = {16: {"tokens": 256 * 256, "steps": 300, "batch": 16, "e2e_steps": 60, "e2e_lr": 2e-4},
           32: {}}
REGENERATE = "make artifact RANK={r}"


def check_variant(variant: str) -> None:
    """Raise DefaultModelError (one line, listing the choices) unless `variant` ships here."""
    if variant not in available_variants():
        raise DefaultModelError(f"unknown default-model variant {variant!r} "
                                f"(choose from {', '.join(available_variants())})")


def _rank(variant: str) -> int:
    if not variant.startswith("thin-r") or not variant[6:].isdigit():
        check_variant(variant)          # raises: not a thin-r<R> name
    return int(variant[6:])


def artifact_paths(rank: int) -> tuple[Path, Path]:
    stem = ARTIFACT_DIR / f"{MODEL_NAME}-thin-r{rank}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def available_variants() -> list[str]:
    """``original`` plus every thin-r<R> whose artifact ships with this installation."""
    ranks = sorted(int(p.stem.rsplit("-r", 1)[1]) for p in ARTIFACT_DIR.glob(f"{MODEL_NAME}-thin-r*.json"))
    return [ORIGINAL] + [f"thin-r{r}" for r in ranks]


def variant_dir(variant: str, cache_dir=None) -> Path:
    if variant == ORIGINAL:
        return default_model_dir(cache_dir)
    return default_model_dir(cache_dir).with_name(f"{MODEL_NAME}-thin-r{_rank(variant)}-cal")


def _thin_keys(state: dict) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if k.endswith(("self_attn.q_proj.weight",
                                                          "self_attn.k_proj.weight"))}


def export_artifact(ckpt: str | Path) -> Path:
    """Write the artifact + manifest of a calibrated factored checkpoint of the default model."""
    ckpt = Path(ckpt)
    fk = FactoredKeysConfig.from_hf_config(json.loads((ckpt / "config.json").read_text()))
    rank = fk.uniform_rank
    if rank is None:
        raise ValueError("only uniform-rank checkpoints are exported")
    thin = {k: v.to(torch.float16).contiguous()
            for k, v in _thin_keys(load_file(str(ckpt / "model.safetensors"))).items()}
    weights, manifest = artifact_paths(rank)
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    save_file(thin, str(weights), metadata={"format": "pt"})
    manifest.write_text(json.dumps({
        "model": MODEL_NAME, "variant": f"thin-r{rank}", "file": weights.name,
        "sha256": sha256_file(weights), "dtype": "float16", "factored_keys": fk.to_block(),
        "regenerate": REGENERATE.format(r=rank)}, indent=1) + "\n")
    return weights


def _is_built(out: Path, sha: str) -> bool:
    try:
        return json.loads((out / MARKER).read_text()).get("artifact_sha256") == sha
    except (OSError, ValueError):
        return False


def prepare_variant(variant: str = DEFAULT_VARIANT, cache_dir=None, quiet: bool = False,
                    force: bool = False) -> Path:
    """The directory of a default-model variant, built once (see the module docstring);
    ``force`` rebuilds it and the prepared original it comes from."""
    check_variant(variant)
    src = prepare_default_model(cache_dir, force=force, quiet=quiet)
    if variant == ORIGINAL:
        return src
    weights, manifest_path = artifact_paths(_rank(variant))
    if not weights.exists():
        raise DefaultModelError(f"{weights} is missing (its manifest is there)")
    manifest = json.loads(manifest_path.read_text())
    out = variant_dir(variant, cache_dir)
    if not force and _is_built(out, manifest["sha256"]):
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if not force and _is_built(out, manifest["sha256"]):
            return out
        sha = sha256_file(weights)
        if sha != manifest["sha256"]:
            raise DefaultModelError(f"{weights.name}: sha256 {sha[:12]}… does not match its "
                                    f"manifest ({manifest['sha256'][:12]}…); regenerate it with "
                                    f"`{manifest['regenerate']}`")
        state = load_file(str(src / "model.safetensors"))
        thin = load_file(str(weights))
        missing = set(_thin_keys(state)) - set(thin)
        if missing:
            raise DefaultModelError(f"{weights.name} lacks {sorted(missing)[0]}")
        state.update({k: v.float() for k, v in thin.items()})
        cfg = json.loads((src / "config.json").read_text())
        fk = FactoredKeysConfig.from_hf_config({**cfg, BLOCK: manifest["factored_keys"]})
        cfg = {**cfg, "architectures": [LLAMA_ARCH], BLOCK: fk.to_block()}

        def finish(tmp: Path) -> None:
            validate_checkpoint_dir(tmp)
            (tmp / "factorkv-prepared.json").unlink(missing_ok=True)
            (tmp / MARKER).write_text(json.dumps({"variant": variant, "artifact": weights.name,
                                                  "artifact_sha256": sha}, indent=1))
        if not quiet:
            print(f"factorkv: building {out.name} from {weights.name}", flush=True)
        write_checkpoint(src, out, cfg, state, force=True, validate=finish)
    return out


def regenerate(rank: int, cache_dir=None, progress: bool = True) -> Path:
    """Calibrate the default model at `rank` with RECIPES[rank] (the converter's defaults for
    other ranks) and export the artifact. Resumable: the calibration keeps its progress next
    to its work checkpoint in the cache."""
    src = prepare_default_model(cache_dir, quiet=not progress)
    work = src.parent / f".artifact-work-r{rank}"
    convert(src, work, key_rank=rank, calibrate=True, calibration=dict(RECIPES.get(rank, {})),
            force=True, progress=progress)
    path = export_artifact(work)
    shutil.rmtree(work, ignore_errors=True)
    return path


def _main(argv: list[str]) -> int:
    import sys
    usage = ("usage: python -m model_patches.conversion.default_variants "
             "{export CALIBRATED_CHECKPOINT | regenerate RANK}")
    if len(argv) != 2 or argv[0] not in ("export", "regenerate") or \
            (argv[0] == "regenerate" and not argv[1].isdigit()):
        print(usage, file=sys.stderr)
        return 2
    path = export_artifact(argv[1]) if argv[0] == "export" else regenerate(int(argv[1]))
    print(f"{path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(_main(sys.argv[1:]))
