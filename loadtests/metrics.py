"""A running server's numbers as the load tests read them: vLLM's Prometheus ``/metrics``
(sampled while a point runs, or read before and after it), ``GET`` JSON routes, and
nearest-rank percentiles.

    samples = []; stop = asyncio.Event()
    task = asyncio.create_task(sample_metrics(session, url, samples, stop, 0.25))
    before = await fetch_metrics(session, url)    # {"t": ..., "vllm:...": value}
    ...
    delta = counter_delta(before, after, "vllm:num_preemptions_total")
"""

from __future__ import annotations

import asyncio
import json
import time

#: The vLLM series the load tests read (summed over label sets, e.g. per engine).
WANTED = frozenset({
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:generation_tokens_total", "vllm:prompt_tokens_total",
    "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
})


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def parse_metrics(text: str) -> dict[str, float]:
    """The WANTED series of one /metrics scrape, plus ``t`` (perf_counter at parse time)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {"t": time.perf_counter()}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in WANTED:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


def counter_delta(before: dict[str, float], after: dict[str, float], name: str) -> float:
    """How much a counter grew between two scrapes (0 where the series is absent)."""
    return after.get(name, 0.0) - before.get(name, 0.0)


def prefix_cache_hit_rate(before: dict[str, float], after: dict[str, float]) -> float | None:
    """Prefix-cache hits / queries (tokens) between two scrapes; None with no queries."""
    queries = counter_delta(before, after, "vllm:prefix_cache_queries_total")
    hits = counter_delta(before, after, "vllm:prefix_cache_hits_total")
    return hits / queries if queries > 0 else None


async def fetch_metrics(session, url: str) -> dict[str, float]:
    async with session.get(f"{url}/metrics") as r:
        return parse_metrics(await r.text())


async def sample_metrics(session, url: str, samples: list[dict], stop: asyncio.Event,
                         period: float = 0.25) -> None:
    """Append a parsed scrape to ``samples`` every ``period`` s until ``stop`` is set."""
    while not stop.is_set():
        try:
            async with session.get(f"{url}/metrics") as r:
                samples.append(parse_metrics(await r.text()))
        except Exception:  # noqa: BLE001 - a missed sample is not a failure of the server
            pass
        try:
            await asyncio.wait_for(stop.wait(), period)
        except asyncio.TimeoutError:
            pass


def saturated_throughput(samples: list[dict]) -> float | None:
    """Generated tokens/s over the sampling intervals during which requests were waiting
    (the KV cache was full), from vllm:generation_tokens_total; None if never saturated."""
    tokens = seconds = 0.0
    for a, b in zip(samples, samples[1:]):
        if a.get("vllm:num_requests_waiting", 0) > 0 and b.get("vllm:num_requests_waiting", 0) > 0:
            tokens += b.get("vllm:generation_tokens_total", 0) - a.get("vllm:generation_tokens_total", 0)
            seconds += b["t"] - a["t"]
    return tokens / seconds if seconds >= 5 else None


def get_json(url: str, api_key: str | None = None) -> dict:
    """GET a JSON route (stdlib; 30 s timeout)."""
    return json.loads(_get(url, api_key))


def scrape(url: str, api_key: str | None = None) -> dict[str, float]:
    """One /metrics scrape of the server at ``url``, parsed (stdlib; 30 s timeout)."""
    return parse_metrics(_get(f"{url}/metrics", api_key).decode("utf-8", "replace"))


def _get(url: str, api_key: str | None) -> bytes:
    import urllib.request

    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {api_key}"} if api_key else {})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.read()
