"""FactorKV's own HTTP routes and Prometheus metrics, added on top of vLLM's OpenAI app.

`factorkv serve` builds vLLM's app (``build_app`` + ``init_app_state``) and then calls
:func:`install_factorkv_extensions` (app, engine_client). To add something:

* an HTTP route: add it to :data:`router` here, or call ``add_router(my_router)``
  at import time from another module (before the server starts);
* a Prometheus collector: ``register_collector(my_collector)`` (any object with
  ``collect()`` yielding metric families, see prometheus_client's custom collectors);
  it is exported by vLLM's own ``GET /metrics``;
* anything else needing the engine: ``add_startup_hook(fn)`` with
  ``fn(app, engine_client)``, called once after init_app_state.

Avoid paths under ``/metrics`` (vLLM mounts that prefix) and ``/v1`` (OpenAI API).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, FastAPI, Request

#: Routes of FactorKV itself; included into vLLM's app by install_factorkv_extensions.
router = APIRouter(tags=["factorkv"])

_extra_routers: list[APIRouter] = []
_collectors: list[Any] = []
_startup_hooks: list[Callable[[FastAPI, Any], None]] = []


def add_router(r: APIRouter) -> None:
    """Include another APIRouter in the served app."""
    if r not in _extra_routers:
        _extra_routers.append(r)


def register_collector(collector: Any) -> None:
    """Export a prometheus_client collector through vLLM's /metrics."""
    if collector not in _collectors:
        _collectors.append(collector)


def add_startup_hook(fn: Callable[[FastAPI, Any], None]) -> None:
    """Run ``fn(app, engine_client)`` after vLLM's app state is initialised."""
    if fn not in _startup_hooks:
        _startup_hooks.append(fn)


def server_info(engine_client: Any) -> dict[str, Any]:
    """What the running server is: model, dtype and the KV cache capacity vLLM allocated."""
    from importlib.metadata import PackageNotFoundError, version

    cfg = engine_client.vllm_config
    cache = cfg.cache_config
    model = cfg.model_config
    try:
        fkv_version = version("factorkv")
    except PackageNotFoundError:
        fkv_version = "unknown"
    num_blocks = getattr(cache, "num_gpu_blocks", None)
    tokens = getattr(cache, "kv_cache_size_tokens", None)
    if tokens is None and num_blocks is not None:
        tokens = num_blocks * cache.block_size
    hf = model.hf_config
    return {
        "factorkv_version": fkv_version,
        "model": model.model,
        "served_model_name": model.served_model_name,
        "architectures": list(getattr(hf, "architectures", None) or []),
        "factored_keys": getattr(hf, "factored_keys", None),
        "dtype": str(model.dtype).removeprefix("torch."),
        "enforce_eager": bool(model.enforce_eager),
        "max_model_len": model.max_model_len,
        "max_num_seqs": cfg.scheduler_config.max_num_seqs,
        "kv_cache": {
            "memory_bytes": cache.kv_cache_memory_bytes,
            "block_size": cache.block_size,
            "num_blocks": num_blocks,
            "size_tokens": tokens,
            "max_concurrency": getattr(cache, "kv_cache_max_concurrency", None),
            "cache_dtype": str(cache.cache_dtype),
        },
    }


@router.get("/factorkv/info")
async def factorkv_info(request: Request) -> dict[str, Any]:
    """Server facts as JSON (model, dtype, KV cache capacity in blocks and tokens)."""
    return server_info(request.app.state.engine_client)


class _InfoCollector:
    """factorkv_kv_cache_capacity_tokens / _blocks: the KV capacity vLLM allocated."""

    def __init__(self, engine_client: Any):
        self.engine_client = engine_client

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        info = server_info(self.engine_client)
        name = str(info["served_model_name"])
        kv = info["kv_cache"]
        for key, doc in (("size_tokens", "KV cache capacity in tokens"),
                         ("num_blocks", "KV cache capacity in blocks")):
            if kv[key] is None:
                continue
            suffix = "tokens" if key == "size_tokens" else "blocks"
            g = GaugeMetricFamily(f"factorkv_kv_cache_capacity_{suffix}", doc, labels=["model_name"])
            g.add_metric([name], float(kv[key]))
            yield g


def install_factorkv_extensions(app: FastAPI, engine_client: Any) -> None:
    """Called by `factorkv serve` right after vLLM's init_app_state (before serving)."""
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    import server.kv_metrics  # noqa: F401  (registers /v1/kv-cache, the KV gauges, the log line)

    app.include_router(router)
    for r in _extra_routers:
        app.include_router(r)

    registry = get_prometheus_registry()
    for collector in [_InfoCollector(engine_client), *_collectors]:
        try:
            registry.register(collector)
        except ValueError:  # already registered (duplicate names): keep the first
            pass
    for fn in _startup_hooks:
        fn(app, engine_client)
