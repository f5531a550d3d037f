"""vLLM CPU worker whose model runner compacts evicted requests and runs them on physical lengths.

Plugged in with vLLM's ``--worker-cls engine.eviction.worker.EvictingCPUWorker``. Reads two
fields the :class:`engine.eviction.scheduler.EvictionScheduler` adds to each SchedulerOutput:

* ``factorkv_compactions {req: (n, policy)}``: before anything else in the step, compact the
  request's first n cached tokens in every layer (engine/eviction/compaction.py) and cut
  its block table to ceil(k / bs) blocks, as the scheduler already did with its blocks;
* ``factorkv_offsets {req: e}``: the request's cache holds e fewer tokens than its logical
  length. After vLLM's ``_prepare_inputs``, for those requests:

      positions     unchanged (logical: RoPE continues from the logical position)
      seq_lens      -= e      (attention reads the physical cache)
      slot_mapping  from (position - e)

Latent-key layers (FACTORKV_LATENT) rotate cached keys at read time, so the worker keeps each
compacted request's kept positions per layer and hands the step's slot -> position table to
those layers' attention (``LatentKeyImpl.key_positions``).

Everything else (block table, query_start_loc, sampling) is vLLM's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from vllm.logger import init_logger
from vllm.v1.worker.cpu_model_runner import CPUModelRunner
from vllm.v1.worker.cpu_worker import CPUWorker

from engine.eviction.compaction import LayerCache, compact, layer_cache
from engine.eviction.policy import L2NormPolicy

logger = init_logger(__name__)


class EvictingRunnerMixin:
    """Adds compaction and physical/logical lengths to a V1 GPUModelRunner subclass."""

    _evict_offsets: dict[str, int] = {}
    _evict_layers: list[LayerCache] | None = None
    _latent_impls: dict | None = None                  # layer name -> LatentKeyImpl
    _latent_kept: dict[str, dict[str, torch.Tensor]] | None = None   # req -> layer -> sel [k]

    def _eviction_layers(self) -> list[LayerCache]:
        if self._evict_layers is None:
            ctx = self.compilation_config.static_forward_context
            block_size = self.cache_config.block_size
            layers = []
            for name, layer in ctx.items():
                kv = getattr(layer, "kv_cache", None)
                if isinstance(kv, list | tuple):
                    kv = kv[0] if kv else None
                if not isinstance(kv, torch.Tensor) or kv.numel() == 0:
                    continue
                backend = layer.attn_backend.get_name()
                impl = layer.impl if backend == "FACTORKV_LATENT" else None
                layers.append(layer_cache(name, backend, kv, layer.head_size, block_size,
                                          getattr(layer, "isa", None),
                                          latent=_rebuild_fn(impl) if impl else None))
            if not layers:
                raise RuntimeError("kv-evict: no attention layer with a KV cache found")
            self._evict_layers = layers
            self._latent_impls = {c.name: ctx[c.name].impl for c in layers if c.latent}
            self._latent_kept = {}
        return self._evict_layers

    def _apply_compactions(self, compactions: dict) -> None:
        block_size = self.cache_config.block_size
        for req_id, (n, policy_dict) in compactions.items():
            state = self.requests.get(req_id)
            if state is None:
                continue
            policy = L2NormPolicy(**policy_dict)
            block_ids = state.block_ids[0]
            for cache in self._eviction_layers():
                sel = compact(cache, block_ids, n, policy)
                if cache.latent is not None:
                    self._latent_kept.setdefault(req_id, {})[cache.name] = sel[0]
            k = sel.shape[1]
            del block_ids[math.ceil(k / block_size):]
            row = self.input_batch.req_id_to_index.get(req_id)
            if row is not None:
                self.input_batch.block_table.add_row(state.block_ids, row)

    def execute_model(self, scheduler_output, intermediate_tensors=None):
        compactions = getattr(scheduler_output, "factorkv_compactions", None)
        if compactions:
            self._apply_compactions(compactions)
        self._evict_offsets = getattr(scheduler_output, "factorkv_offsets", None) or {}
        if self._latent_impls:
            for impl in self._latent_impls.values():
                impl.key_positions = None
            for req_id in [r for r in self._latent_kept if r not in self.requests]:
                del self._latent_kept[req_id]
        return super().execute_model(scheduler_output, intermediate_tensors)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens: np.ndarray):
        result = super()._prepare_inputs(scheduler_output, num_scheduled_tokens)
        if self._evict_offsets:
            self._apply_offsets(num_scheduled_tokens)
        return result

    def _apply_offsets(self, num_scheduled_tokens: np.ndarray) -> None:
        num_reqs = self.input_batch.num_reqs
        offsets = np.array([self._evict_offsets.get(r, 0)
                            for r in self.input_batch.req_ids[:num_reqs]], dtype=np.int64)
        if not offsets.any():
            return
        off = torch.from_numpy(offsets)
        self.seq_lens[:num_reqs] -= off.to(self.seq_lens.dtype)
        self.optimistic_seq_lens_cpu[:num_reqs] -= off.to(self.optimistic_seq_lens_cpu.dtype)
        total = int(num_scheduled_tokens.sum())
        per_token = torch.from_numpy(np.repeat(offsets, num_scheduled_tokens))
        physical = self.positions[:total] - per_token.to(self.positions.dtype)
        self.input_batch.block_table.compute_slot_mapping(
            num_reqs, self.query_start_loc.gpu[: num_reqs + 1], physical)
        if self._latent_impls:
            self._set_key_positions(offsets)

    def _set_key_positions(self, offsets: np.ndarray) -> None:
        """Latent-key layers rotate each cached key at its token's position: for this step's
        requests, slot t < k of a compacted request holds kept token sel[t] (its layer's
        selection), slot t >= k the token at t + e (e = its offset); others slot t = t."""
        req_ids = self.input_batch.req_ids[:len(offsets)]
        length = int(self.seq_lens[:len(offsets)].max())
        base = torch.arange(length)[None] + torch.from_numpy(offsets)[:, None]    # [R, L]
        for name, impl in self._latent_impls.items():
            table = base.clone()
            for i, req_id in enumerate(req_ids):
                sel = self._latent_kept.get(req_id, {}).get(name)
                if sel is not None and offsets[i]:
                    table[i, :len(sel)] = sel
            impl.key_positions = table.to(torch.int32)


def _rebuild_fn(impl):
    """Latent slots [H_kv, n, r] -> pre-RoPE keys [H_kv, n, D] of one latent layer."""
    return lambda slots: impl.rebuild_keys(slots.transpose(0, 1)).transpose(0, 1)


class EvictingCPUModelRunner(EvictingRunnerMixin, CPUModelRunner):
    pass


class EvictingCPUWorker(CPUWorker):
    def init_device(self) -> None:
        super().init_device()
        if type(self.model_runner) is not CPUModelRunner:
            raise RuntimeError(
                f"kv-evict needs vLLM's V1 CPU model runner, got {type(self.model_runner).__name__}")
        self.model_runner.__class__ = EvictingCPUModelRunner
        logger.info("FactorKV KV eviction: CPU model runner with compaction")
