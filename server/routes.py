"""FactorKV's own HTTP routes and Prometheus metrics, added on top of vLLM's OpenAI app.

`factorkv serve` builds vLLM's app (``build_app`` + ``init_app_state``) and then calls
:func:`install_factorkv_extensions` (app, engine_client) here and
:func:`server.kv_metrics.install_kv_metrics`. To add a route, add it to :data:`router`
(or a router of your own module, installed from ``server.http_server.build_and_serve``); to add
a Prometheus collector (an object whose ``collect()`` yields metric families), register it
in :func:`install_factorkv_extensions`: vLLM's own ``GET /metrics`` exports it.

Avoid paths under ``/metrics`` (vLLM mounts that prefix) and ``/v1`` (OpenAI API).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from prometheus_client.core import GaugeMetricFamily
from vllm.v1.metrics.prometheus import get_prometheus_registry

#: Routes of FactorKV itself; included into vLLM's app by install_factorkv_extensions.
router = APIRouter(tags=["factorkv"])


def server_info(engine_client: Any) -> dict[str, Any]:
    """What the running server is: model, dtype and the KV cache capacity vLLM allocated."""
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
    """Add GET /factorkv/info and the capacity gauges (called by `factorkv serve` right
    after vLLM's init_app_state, before serving)."""
    app.include_router(router)
    try:
        get_prometheus_registry().register(_InfoCollector(engine_client))
    except ValueError:  # already registered (duplicate names): keep the first
        pass
