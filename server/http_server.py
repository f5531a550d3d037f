"""The HTTP server of `factorkv serve`: vLLM's ``run_server`` / ``build_and_serve``
(vllm/entrypoints/launchers/api_server/entry.py) for one API server, with FactorKV's
additions: after ``init_app_state`` it calls
:func:`server.routes.install_factorkv_extensions`, :func:`server.kv_metrics.install_kv_metrics`
and :func:`server.guards.install_guards`; and when vLLM stops serving because the engine
process died, it raises a one-line CLIError (exit status 1) instead of returning, so that
an orchestrator restarts it.

Imports vLLM at module level: :mod:`server.serve` imports this module only once the
arguments are checked.
"""

from __future__ import annotations

import argparse
import signal
import sys

import vllm.envs as envs
from vllm.entrypoints.launchers.api_server.app_state import init_app_state
from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client
from vllm.entrypoints.launchers.app import build_app
from vllm.entrypoints.launchers.launcher import serve_http, setup_server
from vllm.entrypoints.launchers.utils.server_utils import get_uvicorn_log_config
from vllm.reasoning import ReasoningParserManager
from vllm.tool_parsers import ToolParserManager
from vllm.utils.system_utils import decorate_logs

from server.errors import CLIError
from server.guards import install_guards
from server.kv_metrics import install_kv_metrics
from server.routes import install_factorkv_extensions, server_info


async def run_server(args: argparse.Namespace, **uvicorn_kwargs) -> None:
    """vLLM's run_server + run_server_worker for a single API server."""
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
    log_config = get_uvicorn_log_config(args)
    if log_config is not None:
        uvicorn_kwargs["log_config"] = log_config

    supported_tasks = await engine_client.get_supported_tasks()
    app = build_app(args, supported_tasks, engine_client.model_config)
    await init_app_state(engine_client, app.state, args, supported_tasks)
    # --- FactorKV hook: our own routes and Prometheus collectors, then the guards. ---
    install_factorkv_extensions(app, engine_client)  # GET /factorkv/info, capacity gauges
    install_kv_metrics(app, engine_client)  # GET /v1/kv-cache, KV gauges, start-up log line
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
