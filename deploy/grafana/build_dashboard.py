"""Writes deploy/grafana/dashboards/factorkv.json, the provisioned FactorKV dashboard.

    python deploy/grafana/build_dashboard.py          # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check  # exit 1 if the JSON is stale

The dashboard is generated so the PromQL stays readable here; tests/test_deploy.py checks
that the committed JSON matches and that every metric it queries is in
deploy/metric_names.txt (and exported by a live server).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "factorkv.json"
DS = {"type": "prometheus", "uid": "prometheus"}
SEL = '{instance=~"$instance"}'  # every query is filtered by the instance variable
RATE = "$__rate_interval"


def q(expr: str, legend: str, ref: str) -> dict:
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": True}


def hist_quantiles(family: str, qs=(0.5, 0.9, 0.99)) -> list[dict]:
    return [
        q(
            f"histogram_quantile({p}, sum by (le) (rate({family}_bucket{SEL}[{RATE}])))",
            f"p{round(p * 100)}",
            chr(ord("A") + i),
        )
        for i, p in enumerate(qs)
    ]


def panel(kind: str, title: str, desc: str, targets: list[dict], unit: str, grid, **opts) -> dict:
    x, y, w, h = grid
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit, **opts.pop("defaults", {})}, "overrides": []},
        "options": opts.pop("options", {}),
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"].setdefault("custom", {"lineWidth": 2, "fillOpacity": 10})
        p["options"].setdefault("legend", {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]})
        p["options"].setdefault("tooltip", {"mode": "multi", "sort": "desc"})
    if kind == "stat":
        p["options"].setdefault("reduceOptions", {"calcs": ["lastNotNull"], "fields": "", "values": False})
        p["options"].setdefault("colorMode", "value")
        p["options"].setdefault("graphMode", "area")
    return p


def panels() -> list[dict]:
    P = []
    # --- Row 0: headline numbers (the point of FactorKV) ---
    P.append(panel(
        "stat", "Concurrency gain vs baseline",
        "Users that fit in the same KV memory at the configured context, FactorKV / stock vLLM "
        "(factorkv_concurrency_gain = factorkv_max_users_at_context / "
        "factorkv_baseline_max_users_at_context).",
        [q(f"max(factorkv_concurrency_gain{SEL})", "gain", "A")], "x", (0, 0, 6, 5),
        defaults={"decimals": 2, "thresholds": {"mode": "absolute", "steps": [
            {"color": "red", "value": None}, {"color": "yellow", "value": 1.0}, {"color": "green", "value": 1.2}]}},
    ))
    P.append(panel(
        "stat", "Max users at context (FactorKV vs baseline)",
        "How many requests of the configured context length fit in the KV cache, per replica.",
        [q(f"max(factorkv_max_users_at_context{SEL})", "FactorKV", "A"),
         q(f"max(factorkv_baseline_max_users_at_context{SEL})", "baseline", "B")],
        "short", (6, 0, 6, 5), defaults={"decimals": 0},
    ))
    P.append(panel(
        "stat", "KV bytes per token (FactorKV vs baseline)",
        "Physical KV-cache bytes one token takes across all layers and KV heads.",
        [q(f"max(factorkv_kv_bytes_per_token{SEL})", "FactorKV", "A"),
         q(f"max(factorkv_baseline_kv_bytes_per_token{SEL})", "baseline", "B")],
        "bytes", (12, 0, 6, 5),
    ))
    P.append(panel(
        "stat", "KV capacity (tokens, all replicas)",
        "Tokens the paged KV cache holds, summed over the selected replicas.",
        [q(f"sum(factorkv_kv_capacity_tokens{SEL})", "tokens", "A")], "short", (18, 0, 6, 5),
        defaults={"decimals": 0},
    ))
    # --- Row 1: load ---
    P.append(panel(
        "timeseries", "KV cache usage",
        "Fraction of the paged KV cache in use, per replica (vLLM's vllm:kv_cache_usage_perc "
        "and FactorKV's factorkv_kv_usage_ratio; 1.0 = full, new requests wait or preempt).",
        [q(f"max by (instance) (vllm:kv_cache_usage_perc{SEL})", "{{instance}} vLLM", "A"),
         q(f"max by (instance) (factorkv_kv_usage_ratio{SEL})", "{{instance}} FactorKV", "B")],
        "percentunit", (0, 5, 12, 8), defaults={"min": 0, "max": 1},
    ))
    P.append(panel(
        "timeseries", "Running and waiting users",
        "Requests being decoded (running) and queued for KV space (waiting). Waiting > 0 for "
        "long means the replica is KV-bound: scale out (the HPA uses vllm:num_requests_waiting).",
        [q(f"sum(vllm:num_requests_running{SEL})", "running (vLLM)", "A"),
         q(f"sum(vllm:num_requests_waiting{SEL})", "waiting (vLLM)", "B"),
         q(f"sum(factorkv_running_users{SEL})", "running (FactorKV)", "C"),
         q(f"sum(factorkv_waiting_users{SEL})", "waiting (FactorKV)", "D")],
        "short", (12, 5, 12, 8), defaults={"min": 0, "decimals": 0},
    ))
    # --- Row 2: memory per user, gain, throughput ---
    P.append(panel(
        "timeseries", "KV memory per user",
        "KV-cache bytes one user holds at the maximum context length and at the mean context "
        "length of the requests served.",
        [q(f"max by (instance) (factorkv_kv_bytes_per_user_max_context{SEL})", "{{instance}} at max context", "A"),
         q(f"max by (instance) (factorkv_kv_bytes_per_user_mean_context{SEL})", "{{instance}} at mean context", "B")],
        "bytes", (0, 13, 8, 8), defaults={"min": 0},
    ))
    P.append(panel(
        "timeseries", "Concurrency gain vs baseline",
        "Users per replica at the configured context: FactorKV vs a stock vLLM cache of the same "
        "memory, and their ratio (right axis).",
        [q(f"max by (instance) (factorkv_max_users_at_context{SEL})", "{{instance}} FactorKV users", "A"),
         q(f"max by (instance) (factorkv_baseline_max_users_at_context{SEL})", "{{instance}} baseline users", "B"),
         q(f"max by (instance) (factorkv_concurrency_gain{SEL})", "{{instance}} gain", "C")],
        "short", (8, 13, 8, 8), defaults={"min": 0},
    ))
    P.append(panel(
        "timeseries", "Output tokens/s",
        "Generated tokens per second, all selected replicas and per replica.",
        [q(f"sum(rate(vllm:generation_tokens_total{SEL}[{RATE}]))", "total", "A"),
         q(f"sum by (instance) (rate(vllm:generation_tokens_total{SEL}[{RATE}]))", "{{instance}}", "B")],
        "short", (16, 13, 8, 8), defaults={"min": 0},
    ))
    # --- Row 3: latency and preemptions ---
    P.append(panel(
        "timeseries", "Time to first token (TTFT)",
        "p50 / p90 / p99 of vllm:time_to_first_token_seconds (queueing + prefill).",
        hist_quantiles("vllm:time_to_first_token_seconds"), "s", (0, 21, 8, 8), defaults={"min": 0},
    ))
    P.append(panel(
        "timeseries", "Time per output token (TPOT)",
        "p50 / p90 / p99 of vllm:request_time_per_output_token_seconds (per-request mean decode "
        "step) and p99 of vllm:inter_token_latency_seconds.",
        hist_quantiles("vllm:request_time_per_output_token_seconds")
        + [q(f"histogram_quantile(0.99, sum by (le) (rate(vllm:inter_token_latency_seconds_bucket{SEL}[{RATE}])))",
             "inter-token p99", "D")],
        "s", (8, 21, 8, 8), defaults={"min": 0},
    ))
    P.append(panel(
        "timeseries", "Preemptions",
        "Requests preempted per second because the KV cache ran out (vllm:num_preemptions). "
        "Sustained preemption means the KV budget is too small for the load.",
        [q(f"sum by (instance) (rate(vllm:num_preemptions_total{SEL}[{RATE}]))", "{{instance}}", "A")],
        "reqps", (16, 21, 8, 8), defaults={"min": 0},
    ))
    # --- Row 4: L2-norm eviction (zero on servers without --kv-evict) ---
    P.append(panel(
        "timeseries", "KV eviction: evicted tokens and freed blocks",
        "Tokens dropped by L2-norm eviction and KV blocks it gave back to the pool, per second "
        "(factorkv serve --kv-evict; docs/eviction.md).",
        [q(f"sum by (instance) (rate(factorkv_evicted_tokens_total{SEL}[{RATE}]))", "{{instance}} tokens/s", "A"),
         q(f"sum by (instance) (rate(factorkv_evict_freed_blocks_total{SEL}[{RATE}]))", "{{instance}} blocks/s", "B")],
        "short", (0, 29, 12, 8), defaults={"min": 0},
    ))
    P.append(panel(
        "timeseries", "KV eviction: logical vs physical tokens",
        "Running requests with eviction: tokens they logically hold (prompt + output) vs tokens "
        "physically in the KV cache.",
        [q(f"sum by (instance) (factorkv_evict_logical_tokens{SEL})", "{{instance}} logical", "A"),
         q(f"sum by (instance) (factorkv_evict_physical_tokens{SEL})", "{{instance}} physical", "B")],
        "short", (12, 29, 12, 8), defaults={"min": 0},
    ))
    for i, p in enumerate(P, start=1):
        p["id"] = i
    return P


def dashboard() -> dict:
    return {
        "uid": "factorkv",
        "title": "FactorKV",
        "description": "FactorKV serving: KV cache usage, users, KV memory per user, concurrency "
                       "gain vs a stock vLLM cache, throughput, TTFT/TPOT, preemptions.",
        "tags": ["factorkv", "vllm", "llm"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": [{
            "name": "instance",
            "label": "Replica",
            "type": "query",
            "datasource": DS,
            "query": {"query": "label_values(vllm:num_requests_running, instance)", "refId": "instance"},
            "definition": "label_values(vllm:num_requests_running, instance)",
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "refresh": 2,
            "sort": 1,
        }]},
        "annotations": {"list": []},
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is stale")
    args = ap.parse_args()
    text = render()
    if args.check:
        ok = OUT.exists() and OUT.read_text() == text
        print(f"{OUT}: {'up to date' if ok else 'STALE: run python deploy/grafana/build_dashboard.py'}")
        return 0 if ok else 1
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
