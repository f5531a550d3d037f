"""vLLM scheduler with L2-norm KV eviction: frees a request's evicted blocks right after prefill.

Plugged in with vLLM's ``--scheduler-cls engine.eviction.scheduler.EvictionScheduler``;
the server policy comes from ``--additional-config '{"factorkv_kv_evict": {...}}'``
(``factorkv serve --kv-evict keep=0.5`` sets both). A request may override ``keep`` with
``SamplingParams.extra_args["kv_evict_keep"]`` (OpenAI API: ``"vllm_xargs": {"kv_evict_keep": 0.3}``).

Per evicting request, in terms of n = cached tokens when its prefill completes and
k = policy.num_kept(n):

  step t     schedule():           prefill completes in this step   -> plan (n)
             worker:               prefill writes all n tokens
             update_from_output(): free the blocks past ceil(k / bs) (they go back to the
                                   pool at once), evicted[req] = n - k
  step t+1   schedule():           SchedulerOutput.factorkv_compactions = {req: (n, policy)}
                                   SchedulerOutput.factorkv_offsets = {req: n - k}
             worker:               compacts the kept tokens into the leading blocks, then
                                   runs with physical length = logical length - offset

The freed blocks are read by the worker's compaction before any new owner writes them:
the worker compacts at the start of step t+1, before that step's forward pass.

Block accounting: ``allocate_slots`` sees the physical length (logical - evicted), so
the request never holds blocks for evicted tokens. Evicting requests never read or
write vLLM's prefix cache (``skip_reading_prefix_cache`` and ``delay_cache_blocks``):
their blocks are rewritten in place, so they must never be shared or served as hits.
Preemption frees every block and recomputes from scratch, so the state is reset.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

from vllm.logger import init_logger
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from engine.eviction.policy import EvictionConfigError, EvictionPolicy, L2NormPolicy
from engine.eviction.stats import write_stats

logger = init_logger(__name__)

CONFIG_KEY = "factorkv_kv_evict"
REQUEST_KEEP_KEY = "kv_evict_keep"
STATS_INTERVAL_S = 0.5


def server_policy(vllm_config: Any) -> tuple[EvictionPolicy, str | None]:
    """The server-wide policy (L2 norm; keep, sink, window) and stats path from
    ``additional_config``."""
    extra = dict((getattr(vllm_config, "additional_config", None) or {}).get(CONFIG_KEY) or {})
    stats_path = extra.pop("stats_path", None)
    return L2NormPolicy(**extra), stats_path


def request_policy(default: EvictionPolicy, request: Request) -> EvictionPolicy:
    """The server policy with the request's ``kv_evict_keep`` override, if any."""
    params = request.sampling_params
    extra = (params.extra_args or {}) if params is not None else {}
    keep = extra.get(REQUEST_KEEP_KEY)
    if keep is None:
        return default
    try:
        return dataclasses.replace(default, keep=float(keep))
    except (TypeError, ValueError) as e:   # the API server validates first; never crash here
        logger.warning("request %s: ignoring %s=%r (%s)", request.request_id,
                       REQUEST_KEEP_KEY, keep, e)
        return default


class EvictionScheduler(Scheduler):
    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        self.evict_policy, self._stats_path = server_policy(vllm_config)
        self._policy: dict[str, EvictionPolicy] = {}   # evicting requests
        self._evicted: dict[str, int] = {}              # logical - physical tokens
        self._planned: dict[str, int] = {}              # prefill completes this step: n
        self._compactions: dict[str, tuple[int, dict]] = {}  # for the next SchedulerOutput
        self.evicted_tokens_total = 0
        self.freed_blocks_total = 0
        self.compactions_total = 0
        self._stats_time = 0.0
        self._stats_dirty = True
        managers = self.kv_cache_manager.coordinator.single_type_managers
        if len(managers) != 1:
            raise EvictionConfigError(
                f"kv-evict: models with {len(managers)} KV cache groups are not supported")
        self._manager = managers[0]
        self._block_size = self._manager.block_size
        self._allocate_slots = self.kv_cache_manager.allocate_slots
        self.kv_cache_manager.allocate_slots = self._allocate_physical_slots
        logger.info("FactorKV KV eviction: server policy %s", self.evict_policy)

    # --- bookkeeping -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        policy = request_policy(self.evict_policy, request)
        if policy.enabled:
            self._policy[request.request_id] = policy
            request.skip_reading_prefix_cache = True
        super().add_request(request)

    def _forget(self, req_id: str) -> None:
        for d in (self._evicted, self._planned, self._compactions):
            d.pop(req_id, None)

    def _preempt_request(self, request: Request, *args, **kwargs) -> None:
        self._forget(request.request_id)   # all blocks are freed; recompute from scratch
        self._stats_dirty = True
        super()._preempt_request(request, *args, **kwargs)

    def _sweep(self) -> None:
        """Drop state of requests that finished or were aborted."""
        for req_id in [r for r in self._policy if r not in self.requests
                       or self.requests[r].is_finished()]:
            self._policy.pop(req_id)
            self._forget(req_id)
            self._stats_dirty = True

    def _allocate_physical_slots(self, request: Request, *args, **kwargs):
        """vLLM's allocate_slots on the request's physical length; never caches its blocks."""
        if request.request_id not in self._policy:
            return self._allocate_slots(request, *args, **kwargs)
        kwargs["delay_cache_blocks"] = True
        evicted = self._evicted.get(request.request_id, 0)
        request.num_computed_tokens -= evicted
        try:
            return self._allocate_slots(request, *args, **kwargs)
        finally:
            request.num_computed_tokens += evicted

    # --- the two scheduler steps ---------------------------------------------------------
    def schedule(self, *args, **kwargs):
        self._sweep()
        out = super().schedule(*args, **kwargs)
        scheduled = out.num_scheduled_tokens
        out.factorkv_compactions = {r: c for r, c in self._compactions.items() if r in self.requests}
        self._compactions = {}
        out.factorkv_offsets = {r: e for r, e in self._evicted.items() if e and r in scheduled}
        for req_id in scheduled:
            if req_id in self._policy and req_id not in self._evicted:
                req = self.requests[req_id]
                if req.num_computed_tokens >= req.num_prompt_tokens:
                    self._planned[req_id] = req.num_computed_tokens
        return out

    def update_from_output(self, scheduler_output, model_runner_output):
        for req_id, n in self._planned.items():
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue
            self._evict(req_id, n, self._policy[req_id])
        self._planned = {}
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        self._sweep()
        now = time.monotonic()
        if self._stats_path and (self._stats_dirty or now - self._stats_time > STATS_INTERVAL_S):
            self._write_stats()
            self._stats_time, self._stats_dirty = now, False
        return outputs

    def _evict(self, req_id: str, n: int, policy: EvictionPolicy) -> None:
        """Free the blocks past the kept tokens; the worker compacts at its next step."""
        k = policy.num_kept(n)
        if k == n:
            self._evicted[req_id] = 0
            return
        blocks = self._manager.req_to_blocks[req_id]
        keep_blocks = math.ceil(k / self._block_size)
        tail = blocks[keep_blocks:]
        del blocks[keep_blocks:]
        self.kv_cache_manager.block_pool.free_blocks(reversed(tail))
        self._evicted[req_id] = n - k
        self._compactions[req_id] = (n, policy.to_dict())
        self.evicted_tokens_total += n - k
        self.freed_blocks_total += len(tail)
        self.compactions_total += 1
        self._stats_dirty = True

    # --- observability -------------------------------------------------------------------
    def eviction_stats(self) -> dict:
        """Totals and, per running evicting request, logical vs physical cached tokens."""
        reqs = {}
        for req_id, policy in self._policy.items():
            req = self.requests.get(req_id)
            if req is None or req.status != RequestStatus.RUNNING:
                continue
            logical = req.num_computed_tokens
            reqs[req_id] = {"logical_tokens": logical,
                            "physical_tokens": logical - self._evicted.get(req_id, 0),
                            "keep": policy.keep}
        return {"policy": self.evict_policy.to_dict(),
                "evicted_tokens_total": self.evicted_tokens_total,
                "freed_blocks_total": self.freed_blocks_total,
                "compactions_total": self.compactions_total,
                "free_blocks": self.kv_cache_manager.block_pool.get_num_free_blocks(),
                "requests": reqs}

    def _write_stats(self) -> None:
        try:
            write_stats(self._stats_path, self.eviction_stats())
        except OSError as e:  # observability must never stop the engine
            logger.warning("cannot write eviction stats to %s: %s", self._stats_path, e)
