"""KV memory per user and the concurrency gain, live: Prometheus gauges, GET /v1/kv-cache,
and one start-up log line.

Static numbers come from the running engine (``cache_config.num_gpu_blocks``,
``block_size``, ``cache_dtype``, ``max_model_len``) and the model's config through
:mod:`engine.kv_layout`; live numbers (running / waiting users, KV usage) are read
from vLLM's own gauges (``vllm:num_requests_running``, ``vllm:num_requests_waiting``,
``vllm:kv_cache_usage_perc``) in the same Prometheus registry, so /metrics and
/v1/kv-cache report what vLLM reports. Nothing here is a hand-typed constant.

Gauges (label ``model_name``; see deploy/metric_names.txt):

=========================================  ==============================================
factorkv_kv_bytes_per_token                KV bytes one token costs in this model
factorkv_baseline_kv_bytes_per_token       ... in the unfactored model
factorkv_kv_capacity_tokens                tokens the engine's KV pool holds
factorkv_kv_bytes_per_user_max_context     KV bytes of one request at max_model_len
factorkv_kv_bytes_per_user_mean_context    KV bytes per running request, live (0 if idle)
factorkv_max_users_at_context              requests of max_model_len tokens the pool holds
factorkv_baseline_max_users_at_context     ... for the baseline in the same memory
factorkv_concurrency_gain                  the ratio of the two
factorkv_running_users / _waiting_users    live, from vLLM's scheduler gauges
factorkv_kv_usage_ratio                    live fraction of KV blocks in use (0..1)
factorkv_evicted_tokens_total              tokens dropped by L2-norm eviction (counter)
factorkv_evict_freed_blocks_total          KV blocks eviction gave back to the pool (counter)
factorkv_evict_logical_tokens              running evicting requests: logical tokens (sum)
factorkv_evict_physical_tokens             ... tokens physically in the cache (sum)
=========================================  ==============================================

Eviction numbers come from the engine process's scheduler (engine/eviction/stats.py);
they are 0 on a server without ``--kv-evict``.

`factorkv serve` calls :func:`install_kv_metrics` once vLLM's app state is initialised.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from vllm.v1.metrics.prometheus import get_prometheus_registry

from engine.eviction.scheduler import CONFIG_KEY
from engine.eviction.stats import read_stats
from engine.kv_layout import KVCapacity, kv_layout
from server.sizes import format_size

router = APIRouter(tags=["factorkv"])


def engine_capacity(engine_client: Any) -> KVCapacity:
    """The KV pool the engine allocated, as a :class:`KVCapacity`."""
    cfg = engine_client.vllm_config
    cache, model = cfg.cache_config, cfg.model_config
    kv_dtype = model.dtype if str(cache.cache_dtype) == "auto" else cache.cache_dtype
    layout = kv_layout(model.hf_config, kv_dtype)
    budget = cache.kv_cache_memory_bytes  # None when vLLM sized the pool itself
    return KVCapacity(layout, int(cache.block_size), int(cache.num_gpu_blocks or 0),
                      int(budget) if budget else None)


def _vllm_gauge(name: str, model_name: str) -> float:
    """Sum of a vLLM gauge's samples for one model (all engines), read from the registry."""
    collector = get_prometheus_registry()._names_to_collectors.get(name)
    if collector is None:
        return 0.0
    total = 0.0
    for family in collector.collect():
        for sample in family.samples:
            if sample.labels.get("model_name", model_name) == model_name:
                total += sample.value
    return total


def _model_name(engine_client: Any) -> str:
    names = engine_client.vllm_config.model_config.served_model_name
    return names[0] if isinstance(names, (list, tuple)) else str(names)


def eviction_report(engine_client: Any) -> dict[str, Any]:
    """Eviction policy, totals and per running request logical vs physical tokens."""
    extra = (engine_client.vllm_config.additional_config or {}).get(CONFIG_KEY)
    if not extra:
        return {"enabled": False}
    stats = read_stats(extra.get("stats_path")) or {}
    reqs = stats.get("requests", {})
    return {
        "enabled": True,
        "policy": {k: v for k, v in extra.items() if k != "stats_path"},
        "evicted_tokens_total": int(stats.get("evicted_tokens_total", 0)),
        "freed_blocks_total": int(stats.get("freed_blocks_total", 0)),
        "compactions_total": int(stats.get("compactions_total", 0)),
        "logical_tokens": sum(r["logical_tokens"] for r in reqs.values()),
        "physical_tokens": sum(r["physical_tokens"] for r in reqs.values()),
        "requests": reqs,
    }


def kv_cache_report(engine_client: Any, context_tokens: int | None = None) -> dict[str, Any]:
    """Everything /v1/kv-cache returns (and the gauges export), for ``context_tokens``
    per user (default: max_model_len)."""
    cap = engine_capacity(engine_client)
    lay = cap.layout
    max_len = int(engine_client.vllm_config.model_config.max_model_len)
    ctx = int(context_tokens or max_len)
    name = _model_name(engine_client)
    running = _vllm_gauge("vllm:num_requests_running", name)
    waiting = _vllm_gauge("vllm:num_requests_waiting", name)
    usage = _vllm_gauge("vllm:kv_cache_usage_perc", name)  # vLLM: a fraction, 1.0 = full
    used_bytes = usage * cap.memory_bytes
    return {
        "model": name,
        "factored": lay.factored,
        "kv_cache_dtype_bytes": lay.element_bytes,
        "num_layers": lay.num_layers,
        "num_kv_heads": lay.num_kv_heads,
        "head_dim": lay.head_dim,
        "key_dims": list(lay.key_dims) if len(set(lay.key_dims)) > 1 else lay.key_dims[0],
        "key_cache_cut": round(lay.key_cache_cut, 6),
        "bytes_per_token": lay.bytes_per_token,
        "baseline_bytes_per_token": lay.baseline_bytes_per_token,
        "block_size": cap.block_size,
        "num_blocks": cap.num_blocks,
        "memory_bytes": cap.memory_bytes,
        "budget_bytes": cap.budget_bytes,
        "capacity_tokens": cap.capacity_tokens,
        "baseline_capacity_tokens": cap.baseline_capacity_tokens,
        "max_model_len": max_len,
        "context_tokens": ctx,
        "bytes_per_user_at_context": cap.bytes_per_user(ctx),
        "baseline_bytes_per_user_at_context": cap.baseline_bytes_per_user(ctx),
        "bytes_per_user_max_context": cap.bytes_per_user(max_len),
        "max_users_at_context": cap.users(ctx),
        "baseline_max_users_at_context": cap.baseline_users(ctx),
        "concurrency_gain": cap.concurrency_gain(ctx),
        "live": {
            "running_users": int(running),
            "waiting_users": int(waiting),
            "kv_usage_ratio": usage,
            "kv_used_bytes": int(used_bytes),
            "bytes_per_user_mean_context": int(used_bytes / running) if running else 0,
            "mean_context_tokens": (usage * cap.capacity_tokens / running) if running else 0.0,
        },
        "eviction": eviction_report(engine_client),
    }


@router.get("/v1/kv-cache")
async def kv_cache(request: Request,
                   context: int | None = Query(None, ge=1, le=1 << 30,
                                               description="tokens per user (default max_model_len)")):
    """KV memory per token and per user, capacity and the concurrency gain over the
    unfactored baseline in the same memory, plus live usage (JSON)."""
    return JSONResponse(kv_cache_report(request.app.state.engine_client, context))


class KVCacheCollector:
    """Prometheus collector exporting :func:`kv_cache_report` at max_model_len."""

    def __init__(self, engine_client: Any):
        self.engine_client = engine_client

    def describe(self):
        return []  # computed at scrape time; skip the registry's describe-by-collect

    def collect(self):
        r = kv_cache_report(self.engine_client)
        live, ev = r["live"], r["eviction"]
        rows = [
            ("factorkv_kv_bytes_per_token", "KV cache bytes per token (all layers), this model",
             r["bytes_per_token"]),
            ("factorkv_baseline_kv_bytes_per_token",
             "KV cache bytes per token of the unfactored baseline model", r["baseline_bytes_per_token"]),
            ("factorkv_kv_capacity_tokens", "Tokens the KV cache holds (engine's block pool)",
             r["capacity_tokens"]),
            ("factorkv_kv_bytes_per_user_max_context", "KV bytes one request holds at max_model_len",
             r["bytes_per_user_max_context"]),
            ("factorkv_kv_bytes_per_user_mean_context",
             "KV bytes per running request at the live mean context (0 when idle)",
             live["bytes_per_user_mean_context"]),
            ("factorkv_max_users_at_context",
             "Requests of max_model_len tokens the KV cache holds at once", r["max_users_at_context"]),
            ("factorkv_baseline_max_users_at_context",
             "Requests of max_model_len tokens the unfactored baseline holds in the same KV memory",
             r["baseline_max_users_at_context"]),
            ("factorkv_concurrency_gain", "max users at context / baseline max users at context",
             r["concurrency_gain"]),
            ("factorkv_running_users", "Requests running now (vLLM scheduler)", live["running_users"]),
            ("factorkv_waiting_users", "Requests waiting now (vLLM scheduler)", live["waiting_users"]),
            ("factorkv_kv_usage_ratio", "Fraction of KV cache blocks in use (0..1)",
             live["kv_usage_ratio"]),
        ]
        rows += [
            ("factorkv_evict_logical_tokens",
             "Running requests with eviction: logical tokens (prompt + output so far), sum",
             ev.get("logical_tokens", 0)),
            ("factorkv_evict_physical_tokens",
             "Running requests with eviction: tokens physically held in the KV cache, sum",
             ev.get("physical_tokens", 0)),
        ]
        for name, doc, value in rows:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([r["model"]], float(value))
            yield g
        for name, doc, value in (
                ("factorkv_evicted_tokens", "Tokens dropped from the KV cache by L2-norm eviction",
                 ev.get("evicted_tokens_total", 0)),
                ("factorkv_evict_freed_blocks", "KV blocks L2-norm eviction gave back to the pool",
                 ev.get("freed_blocks_total", 0))):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([r["model"]], float(value))
            yield c


def startup_line(engine_client: Any) -> str:
    """One line for the start-up log: bytes per token, capacity, gain at max_model_len."""
    r = kv_cache_report(engine_client)
    return (f"factorkv: KV cache {r['bytes_per_token']} B/token (baseline "
            f"{r['baseline_bytes_per_token']} B/token, key cut {r['key_cache_cut']:.1%}); "
            f"{format_size(r['memory_bytes'])} holds {r['capacity_tokens']} tokens; "
            f"{format_size(r['bytes_per_user_max_context'])} per user at {r['max_model_len']} tokens; "
            f"{r['max_users_at_context']:.2f} users vs {r['baseline_max_users_at_context']:.2f} "
            f"for the baseline ({r['concurrency_gain']:.2f}x)")


def install_kv_metrics(app: FastAPI, engine_client: Any) -> None:
    """Add GET /v1/kv-cache and the KV gauges to the served app, and print the start-up line
    (called by `factorkv serve` after vLLM's init_app_state, before serving)."""
    app.include_router(router)
    try:
        get_prometheus_registry().register(KVCacheCollector(engine_client))
    except ValueError:  # already registered in this process
        pass
    print(startup_line(engine_client), flush=True)
