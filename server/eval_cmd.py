"""`factorkv eval`: the quality benchmark of the default model's factored variants."""

from __future__ import annotations

import argparse
import shlex
import sys

HELP = "quality benchmark (perplexity, passkey, chat, served-engine check) -> docs/results/quality.md"


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


DESCRIPTION = ("Perplexity on held-out Wikipedia and news text, passkey retrieval and greedy chat "
               "answers of the default model and its factored variants (init-rR: converted to "
               "thin keys, cal-rR: converted with --calibrate; latent[G]-init-rR, "
               "latent[G]-cal-rR: RoPE-exact latent keys, G latent groups; served[-latent]-rR: "
               "the shipped build; merge-kvN[-real][-rec[S]][-rR|-cal-rR]: KV "
               "heads merged into N (real: --merge-keys real, rec: --recover, recS: with "
               "S end-to-end steps), then "
               "optionally factored; built on first use), plus one row "
               "recomputed through the vLLM engine. Results are cached per variant; the "
               "report goes to --out. See docs/results/quality.md.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from model_patches.evaluation.quality.variants import DEFAULT_VARIANTS, VARIANT_NAMES

    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated: {VARIANT_NAMES} (default: %(default)s)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="also evaluate this checkpoint, factored or not (repeatable)")
    p.add_argument("--contexts", type=_ints, default=[512, 2048], help="PPL contexts")
    p.add_argument("--eval-tokens", type=int, default=51200,
                   help="held-out tokens per context and text (default: %(default)s)")
    p.add_argument("--texts", default="wiki,news",
                   help="held-out texts for perplexity, comma-separated: wiki (Wikipedia "
                        "articles), news (Australian news); the first one also ranks the KV "
                        "bytes vs perplexity table (default: %(default)s)")
    p.add_argument("--passkey-lengths", type=_ints, default=[2048, 4096])
    p.add_argument("--passkey-n", type=int, default=50,
                   help="passkey prompts per length for --passkey-full variants")
    p.add_argument("--passkey-full", default="original,served-r16",
                   help="variants with --passkey-n prompts (default: %(default)s)")
    p.add_argument("--passkey-n-other", type=int, default=20,
                   help="passkey prompts per length for the other calibrated/extra variants")
    p.add_argument("--copy-n", type=int, default=0,
                   help="long-range copy: windows per text and length for every variant "
                        "(their last 32 tokens repeat tokens 64..95; 0 = skip, the default)")
    p.add_argument("--copy-lengths", type=_ints, default=[1024, 4096],
                   help="long-range copy window lengths (default: 1024,4096)")
    p.add_argument("--passkey-engine", choices=("vllm", "torch"), default="vllm",
                   help="run passkey prompts through vLLM (prefix caching; default) or torch")
    p.add_argument("--vllm-variant", default="served-r16",
                   help="variant recomputed through vLLM ('' to skip; default: %(default)s)")
    p.add_argument("--vllm-ctx", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--work", default=None, help="work dir (default: $FACTORKV_CACHE_DIR/quality)")
    p.add_argument("--out", default="docs/results/quality.md")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from model_patches.evaluation.tasks import EvalError
    from model_patches.evaluation.quality.run import run_benchmark

    from server.errors import CLIError

    variants = [v for v in args.variants.split(",") if v]
    extra = {}
    for item in args.variant:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise CLIError(f"--variant {item!r}: expected NAME=PATH", code=2)
        extra[name] = path
    full = {v for v in args.passkey_full.split(",") if v}
    # chat and passkey for all but the training-free init-rR variants; passkey for --passkey-full
    chat = [v for v in variants + list(extra) if v == "original"
            or v.startswith(("cal-", "merge-", "served-")) or "-cal-" in v or v in extra]
    passkey_n = {v: args.passkey_n if v in full else args.passkey_n_other
                 for v in variants + list(extra) if v in full or v in chat}
    opts = {"variants": variants, "extra": extra, "contexts": args.contexts,
            "eval_tokens": args.eval_tokens, "texts": [t for t in args.texts.split(",") if t],
            "passkey_lengths": args.passkey_lengths, "copy_n": args.copy_n,
            "copy_lengths": args.copy_lengths, "passkey_n": passkey_n, "chat": chat,
            "vllm_variant": args.vllm_variant or None,
            "vllm_ctx": args.vllm_ctx, "passkey_engine": args.passkey_engine, "seed": args.seed, "threads": args.threads,
            "work": args.work, "out": args.out, "progress": not args.quiet}
    command = "factorkv eval " + " ".join(shlex.quote(a) for a in sys.argv[2:]) \
        if sys.argv[1:2] == ["eval"] else "factorkv eval"
    try:
        run_benchmark(opts, command.strip(), log=lambda m: print(m, file=sys.stderr, flush=True))
    except EvalError as e:
        raise CLIError(str(e), code=2) from None
    return 0
