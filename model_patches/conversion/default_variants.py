"""Calibrated factored variants of the default model, built in seconds from the prepared
model plus a small artifact kept in the repository.

Calibration takes minutes of CPU, so its result for the default model ships with the
project: ``model_patches/artifacts/SmolLM2-135M-Instruct-<keys>-r<R>.safetensors`` holds only
the calibrated projections of every layer, float16: ``q_proj``/``k_proj`` for thin keys
(H·r + H_kv·r rows of `hidden` per layer, ~6.6 MB at r = 16); ``q_proj``/``k_proj``/``k_up_proj``
for latent keys (H·D + H_kv·r rows, plus B, ~22 MB at r = 16); ``....json`` is its manifest:
the file's sha256, the checkpoint's ``factored_keys`` block (rank, key mode, rotary table,
method, calibration report) and the command that regenerates it. :func:`prepare_variant`
checks the hash, swaps the weights into the prepared original and writes the checkpoint
atomically under

    $FACTORKV_CACHE_DIR/models/SmolLM2-135M-Instruct-<keys>-r<R>-cal

with a marker recording the artifact's hash (a second call only reads the marker).
Regenerate an artifact (the calibration with RECIPES[variant], then the export) with
``make artifact VARIANT=latent-r16`` (= ``python -m model_patches.conversion.default_variants
regenerate latent-r16``).
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
DEFAULT_VARIANT = "latent-r16"
ORIGINAL = "original"
MARKER = "factorkv-variant.json"
KEY_FORMS = ("thin", "latent")
# The calibration recipe of each shipped artifact (model_patches.conversion.calibrate settings).
# thin-r16: layer-wise on 256 windows of 256 tokens (half chat-formatted), 300 Adam steps of
# 16 windows per layer, then 60 end-to-end KL steps (~30 min on 2 CPU cores).
# thin-r32: the converter's default `--calibrate` (64 windows, 150 steps of 8; ~6 min).
# latent-r<R> (R = 16, 32: the 75 / 50 % key-cache cuts): layer-wise on 128 windows of 256
# tokens, 200 steps of 16, then 40 end-to-end KL steps (~25 min on 2 CPU cores), both stages
# also at PoSE-style positions up to the model's 8,192 (calibrate.skipped_positions: the same
# perplexity, long-range copying kept; docs/results/latent-ladder.md). latent-r8 (87.5 %, not
# shipped) was measured without the PoSE positions.
LATENT_RECIPE = {"tokens": 128 * 256, "steps": 200, "batch": 16, "e2e_steps": 40, "e2e_lr": 2e-4}
LONG_RANGE = {"pos_skip": 8192, "e2e_pos_skip": 8192}
RECIPES = {"thin-r16": {"tokens": 256 * 256, "steps": 300, "batch": 16, "e2e_steps": 60,
                        "e2e_lr": 2e-4},
           "thin-r32": {},
           "latent-r8": LATENT_RECIPE,
           **{f"latent-r{r}": {**LATENT_RECIPE, **LONG_RANGE} for r in (16, 32)}}
REGENERATE = "make artifact VARIANT={v}"


def check_variant(variant: str) -> None:
    """Raise DefaultModelError (one line, listing the choices) unless `variant` ships here."""
    if variant not in available_variants():
        raise DefaultModelError(f"unknown default-model variant {variant!r} "
                                f"(choose from {', '.join(available_variants())})")


def parse_variant_name(variant: str) -> tuple[str, int] | None:
    """("thin" | "latent", rank) of a ``<keys>-r<R>`` name, None for anything else."""
    keys, _, rank = variant.partition("-r")
    if keys not in KEY_FORMS or not rank.isdigit():
        return None
    return keys, int(rank)


def artifact_paths(variant: str) -> tuple[Path, Path]:
    stem = ARTIFACT_DIR / f"{MODEL_NAME}-{variant}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def available_variants() -> list[str]:
    """``original`` plus every <keys>-r<R> whose artifact ships with this installation."""
    names = [p.stem[len(MODEL_NAME) + 1:] for p in ARTIFACT_DIR.glob(f"{MODEL_NAME}-*.json")]
    return [ORIGINAL] + sorted((n for n in names if parse_variant_name(n)),
                               key=lambda n: (parse_variant_name(n)[0] != "latent",
                                              parse_variant_name(n)))


def variant_dir(variant: str, cache_dir=None) -> Path:
    if variant == ORIGINAL:
        return default_model_dir(cache_dir)
    check_variant(variant)
    return default_model_dir(cache_dir).with_name(f"{MODEL_NAME}-{variant}-cal")


def _factored_weights(state: dict) -> dict[str, torch.Tensor]:
    """The tensors a factored build changes: q_proj, k_proj and (latent keys) k_up_proj."""
    return {k: v for k, v in state.items() if k.endswith(("self_attn.q_proj.weight",
                                                          "self_attn.k_proj.weight",
                                                          "self_attn.k_up_proj.weight"))}


def export_artifact(ckpt: str | Path) -> Path:
    """Write the artifact + manifest of a calibrated factored checkpoint of the default model."""
    ckpt = Path(ckpt)
    fk = FactoredKeysConfig.from_hf_config(json.loads((ckpt / "config.json").read_text()))
    rank = fk.uniform_rank
    if rank is None:
        raise ValueError("only uniform-rank checkpoints are exported")
    variant = f"{fk.key_mode}-r{rank}"
    thin = {k: v.to(torch.float16).contiguous()
            for k, v in _factored_weights(load_file(str(ckpt / "model.safetensors"))).items()}
    weights, manifest = artifact_paths(variant)
    ARTIFACT_DIR.mkdir(parents=True, exist_ok=True)
    save_file(thin, str(weights), metadata={"format": "pt"})
    manifest.write_text(json.dumps({
        "model": MODEL_NAME, "variant": variant, "file": weights.name,
        "sha256": sha256_file(weights), "dtype": "float16", "factored_keys": fk.to_block(),
        "regenerate": REGENERATE.format(v=variant)}, indent=1) + "\n")
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
    weights, manifest_path = artifact_paths(variant)
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
        missing = set(_factored_weights(state)) - set(thin)
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


def regenerate(variant: str, cache_dir=None, progress: bool = True) -> Path:
    """Calibrate the default model as `variant` (<keys>-r<R>) with RECIPES[variant] (the
    converter's defaults for others) and export the artifact. Resumable: the calibration keeps
    its progress next to its work checkpoint in the cache."""
    parsed = parse_variant_name(variant)
    if parsed is None:
        raise DefaultModelError(f"{variant!r} is not a <thin|latent>-r<R> variant name")
    keys, rank = parsed
    src = prepare_default_model(cache_dir, quiet=not progress)
    work = src.parent / f".artifact-work-{variant}"
    convert(src, work, key_rank=rank, keys=keys, calibrate=True,
            calibration=dict(RECIPES.get(variant, {})), force=True, progress=progress)
    path = export_artifact(work)
    shutil.rmtree(work, ignore_errors=True)
    return path


def _main(argv: list[str]) -> int:
    import sys
    usage = ("usage: python -m model_patches.conversion.default_variants "
             "{export CALIBRATED_CHECKPOINT | regenerate VARIANT}  (VARIANT: thin-r16, latent-r16, ...)")
    if len(argv) != 2 or argv[0] not in ("export", "regenerate") or \
            (argv[0] == "regenerate" and parse_variant_name(argv[1]) is None):
        print(usage, file=sys.stderr)
        return 2
    path = export_artifact(argv[1]) if argv[0] == "export" else regenerate(argv[1])
    print(f"{path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    import sys
    raise SystemExit(_main(sys.argv[1:]))
