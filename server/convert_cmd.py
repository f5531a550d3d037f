"""`factorkv convert`: an HF checkpoint -> a factored (thin-key) checkpoint."""

from __future__ import annotations

import argparse

HELP = ("convert an HF Llama/GPT-2 checkpoint to factored keys (RoPE-exact latent or thin), "
        "optionally calibrated, and/or merge its KV heads (MHA -> GQA)")
DESCRIPTION = ("Write a factored checkpoint of SRC at DST (docs/checkpoint-format.md) whose key "
               "cache holds r dims per KV head. --keys latent (Llama default): a pre-RoPE latent "
               "of r dims per KV head, from which attention reconstructs the keys and rotates "
               "them with the source's RoPE; --keys thin (GPT-2 default): rank-r keys, the other "
               "factor absorbed into the queries, RoPE on the thin dims. "
               "Data-aware initialisation from calibration text (gensim Wikipedia, "
               "calibration split); --calibrate adds QK-only recovery against SRC. "
               "--kv-heads N merges the KV heads into N (a standard GQA checkpoint that "
               "stock vLLM serves; with --key-rank, merged first, then factored).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from model_patches.conversion.head_merge import MERGE_KEYS
    from model_patches.conversion.latent_init import LATENT_INITS
    from model_patches.conversion.thin_init import METHODS

    p.add_argument("src", help="HF model directory (safetensors)")
    p.add_argument("dst", help="output directory (written atomically)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--key-rank", type=int, metavar="R",
                      help="cached key dims per KV head (latent: the layer's latent has "
                           "R x KV-heads dims)")
    size.add_argument("--key-cache-ratio", type=float, metavar="F",
                      help="kept fraction of key dims, e.g. 0.25 for a 75%% key-cache cut")
    p.add_argument("--kv-heads", type=int, metavar="N",
                   help="merge the KV heads into N (calibrated low-rank merging; N divides the "
                        "query heads and is less than the KV heads)")
    p.add_argument("--merge-keys", choices=MERGE_KEYS, default="complex",
                   help="key merging for --kv-heads: complex = per-frequency complex PCA, exact "
                        "under RoPE (default); real = per-dimension real PCA (does not commute "
                        "with RoPE)")
    p.add_argument("--recover", action="store_true",
                   help="after --kv-heads merging, train the merged attention (q/k/v/o) layer by "
                        "layer to match SRC's attention outputs (uses --calib-tokens/--calib-steps), "
                        "then with --e2e-steps end to end against SRC's next-token distributions")
    p.add_argument("--keys", choices=("latent", "thin"), default=None,
                   help="key form (default: latent for Llama-family sources, thin for GPT-2; "
                        "see docs/methods.md)")
    p.add_argument("--latent-groups", type=int, default=None, metavar="G",
                   help="--keys latent: G independent latents per layer, each shared by "
                        "KV-heads/G heads (default 1: one joint latent; with tensor "
                        "parallelism each group must sit on one rank)")
    p.add_argument("--init", choices=METHODS + LATENT_INITS, default=None,
                   help="initialisation: thin keys " + "|".join(METHODS) + " (default "
                        "partial-rope), latent keys " + "|".join(LATENT_INITS) + " (default pca); "
                        "see docs/methods.md")
    p.add_argument("--calibrate", action="store_true", help="QK-only calibration against SRC")
    p.add_argument("--stat-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens for the initialisation statistics")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="calibration tokens for --calibrate")
    p.add_argument("--calib-steps", type=int, default=None, metavar="N",
                   help="optimizer steps per layer for --calibrate")
    p.add_argument("--calib-batch", type=int, default=None, metavar="N",
                   help="windows of 256 tokens per optimizer step for --calibrate (default 8)")
    p.add_argument("--calib-lr", type=float, default=None, metavar="LR",
                   help="Adam learning rate of the layer-wise calibration (default 2e-3)")
    p.add_argument("--calib-chat-mix", type=float, default=None, metavar="F",
                   help="fraction of calibration windows that are chat-template conversations "
                        "built from the calibration articles (default 0.5; 0 = prose only)")
    p.add_argument("--calib-varied-mix", type=float, default=None, metavar="F",
                   help="fraction of calibration windows taken from the varied texts (the Python "
                        "language reference and 1993 Usenet posts; default 0), in both stages")
    p.add_argument("--calib-pos-skip", type=int, default=None, metavar="P",
                   help="half the calibration windows at PoSE-style positions below P, so short "
                        "windows also train distances up to P (both stages; 0 = off, the "
                        "default; the shipped latent-r16 recipe uses the model's 8192)")
    p.add_argument("--calib-long-steps", type=int, default=None, metavar="N",
                   help="after each layer's short-window steps, N more that add the last 256 "
                        "query rows of 2 of 24 calibration windows of 2048 tokens (0 = off, the "
                        "default, and in every shipped recipe)")
    p.add_argument("--learn-freq", action="store_true",
                   help="--calibrate also trains the thin pairs' rotary frequencies")
    p.add_argument("--e2e-steps", type=int, default=None, metavar="N",
                   help="after the layer-wise calibration, N end-to-end KL steps over thin q/k "
                        "(with --recover: over the merged q/k/v/o) (4 x 256 tokens each; ~7 s per "
                        "step on 2 CPU cores for the default model)")
    p.add_argument("--e2e-lr", type=float, default=None, metavar="LR",
                   help="learning rate of the end-to-end pass (default 1e-4)")
    p.add_argument("--force", action="store_true", help="replace DST if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from model_patches.conversion.activation_stats import DEFAULT_STAT_TOKENS
    from model_patches.conversion.checkpoint_writer import ConversionError
    from model_patches.conversion.convert import convert

    from server.errors import CLIError

    if args.calib_chat_mix is not None and not 0 <= args.calib_chat_mix <= 1:
        raise CLIError(f"--calib-chat-mix must be in [0, 1], got {args.calib_chat_mix}")
    if args.calib_varied_mix is not None and not 0 <= args.calib_varied_mix <= 1:
        raise CLIError(f"--calib-varied-mix must be in [0, 1], got {args.calib_varied_mix}")
    for flag, v in (("--calib-batch", args.calib_batch), ("--calib-tokens", args.calib_tokens),
                    ("--calib-steps", args.calib_steps)):
        if v is not None and v < 1:
            raise CLIError(f"{flag} must be at least 1, got {v}")
    if args.calib_long_steps is not None and args.calib_long_steps < 0:
        raise CLIError(f"--calib-long-steps must be at least 0, got {args.calib_long_steps}")
    if args.calib_lr is not None and not args.calib_lr > 0:
        raise CLIError(f"--calib-lr must be positive, got {args.calib_lr}")
    mix = args.calib_chat_mix
    calibration = {k: v for k, v in (("tokens", args.calib_tokens), ("steps", args.calib_steps),
                                     ("batch", args.calib_batch), ("lr", args.calib_lr),
                                     ("chat_mix", mix),
                                     ("e2e_chat_mix", mix),
                                     ("varied_mix", args.calib_varied_mix),
                                     ("e2e_varied_mix", args.calib_varied_mix),
                                     ("pos_skip", args.calib_pos_skip),
                                     ("e2e_pos_skip", args.calib_pos_skip),
                                     ("long_steps", args.calib_long_steps),
                                     ("e2e_steps", args.e2e_steps), ("e2e_lr", args.e2e_lr))
                   if v is not None}
    if args.learn_freq:
        calibration["learn_freq"] = True
    recover = None
    if args.recover:
        recover = {k: v for k, v in (("tokens", args.calib_tokens), ("steps", args.calib_steps),
                                     ("e2e_steps", args.e2e_steps), ("e2e_lr", args.e2e_lr))
                   if v is not None}
        if not args.calibrate:
            calibration = {k: v for k, v in calibration.items() if k not in recover}
    if calibration and not args.calibrate:
        raise CLIError("--calib-*, --learn-freq and --e2e-* need --calibrate"
                       + (" (--recover takes only --calib-tokens/--calib-steps/--e2e-*)"
                          if args.recover else ""), code=2)
    try:
        summary = convert(args.src, args.dst, key_rank=args.key_rank,
                          key_cache_ratio=args.key_cache_ratio, kv_heads=args.kv_heads,
                          merge_keys=args.merge_keys, recover=recover, init=args.init,
                          keys=args.keys, latent_groups=args.latent_groups,
                          calibrate=args.calibrate, calibration=calibration or None,
                          stat_tokens=args.stat_tokens or DEFAULT_STAT_TOKENS, force=args.force,
                          progress=not args.quiet)
    except ConversionError as e:
        raise CLIError(str(e), code=2) from None
    for line in summary.lines():
        print(line)
    return 0
