"""The vLLM 0.32.0 internals KV eviction relies on (docs/eviction.md, "Patch surface").

Fails loudly, naming the internal, when a vLLM upgrade moves one of them; fast (no engine).
"""

from __future__ import annotations

import inspect

import pytest


def test_vllm_version_is_the_pinned_one():
    import vllm

    assert vllm.__version__.startswith("0.32.0"), (
        f"eviction is pinned to vLLM 0.32.0 internals, found {vllm.__version__}: re-check "
        "docs/eviction.md's patch surface before upgrading")


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def test_scheduler_internals():
    from vllm.v1.core.kv_cache_manager import KVCacheManager
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.core.single_type_kv_cache_manager import SingleTypeKVCacheManager

    for name in ("schedule", "update_from_output", "add_request", "_preempt_request"):
        assert callable(getattr(Scheduler, name, None)), f"Scheduler.{name} is gone"
    assert _params(Scheduler._preempt_request)[:2] == ["self", "request"]
    params = _params(KVCacheManager.allocate_slots)
    assert params[:3] == ["self", "request", "num_new_tokens"] and "delay_cache_blocks" in params
    src = inspect.getsource(KVCacheManager.allocate_slots)
    assert "request.num_computed_tokens" in src, "allocate_slots no longer sizes from num_computed_tokens"
    assert "if delay_cache_blocks:" in src
    assert "req_to_blocks" in inspect.getsource(SingleTypeKVCacheManager.__init__)
    assert "skip_reading_prefix_cache" in inspect.getsource(KVCacheManager.prefix_cache_lookup_enabled)
    # our fields ride on SchedulerOutput to the worker: it must stay a plain dataclass
    assert not hasattr(SchedulerOutput, "__slots__")
    # the scheduler updates num_computed_tokens at schedule time (we plan evictions then)
    assert "request.num_computed_tokens += num_scheduled_token" in \
        inspect.getsource(Scheduler._update_after_schedule)


def test_worker_internals():
    from vllm.v1.worker.block_table import MultiGroupBlockTable
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.cpu_worker import CPUWorker
    from vllm.v1.worker.gpu_input_batch import CachedRequestState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    assert _params(GPUModelRunner._prepare_inputs)[1:3] == ["scheduler_output", "num_scheduled_tokens"]
    src = inspect.getsource(GPUModelRunner._prepare_inputs)
    for needle in ("self.seq_lens[:num_reqs] =", "self.optimistic_seq_lens_cpu[:num_reqs]",
                   "compute_slot_mapping(", "self.positions[:total_num_scheduled_tokens] ="):
        assert needle in src, f"GPUModelRunner._prepare_inputs changed: {needle!r} not found"
    exe = inspect.getsource(GPUModelRunner.execute_model)
    assert exe.index("self._update_states(") < exe.index("self._prepare_inputs(")
    for name in ("add_row", "compute_slot_mapping"):
        assert callable(getattr(MultiGroupBlockTable, name))
    assert "block_ids" in CachedRequestState.__dataclass_fields__
    assert "_prepare_inputs" not in CPUModelRunner.__dict__, "CPUModelRunner overrides _prepare_inputs now"
    assert "model_runner = CPUModelRunner(" in inspect.getsource(CPUWorker.init_device)


def test_cpu_attn_layout_is_recognised():
    """The compaction's element maps come from vLLM's own cache writer (fp32, 'vec')."""
    import torch

    from engine.eviction.compaction import _cpu_attn_maps

    keys, values = _cpu_attn_maps(32, 64, "vec")
    assert keys.shape == values.shape == (32, 64)
    assert torch.cat([keys.flatten(), values.flatten()]).sort().values.equal(torch.arange(2 * 32 * 64))


@pytest.mark.parametrize("backend", ["FLASH_ATTN", "TRITON_ATTN"])
def test_unsupported_backends_fail_loudly(backend):
    import torch

    from engine.eviction.compaction import layer_cache
    from engine.eviction.policy import EvictionConfigError

    with pytest.raises(EvictionConfigError, match=backend):
        layer_cache("l0", backend, torch.zeros(2, 1, 16, 128), 64, 16)
