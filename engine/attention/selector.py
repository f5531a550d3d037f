"""Pick the attention backend for thin keys (head_size = r, head_size_v = D) on this platform."""

from __future__ import annotations

from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionBackend


def thin_key_backend(head_size_v: int) -> type[AttentionBackend]:
    """CPU: FactorKV's own backend. CUDA/ROCm: vLLM's TRITON_ATTN_DIFFKV, which reads the same
    packed [.., r + D] cache layout (its V size is class-wide, so it is set here)."""
    if current_platform.is_cpu():
        from engine.attention.cpu_backend import ThinKeyCPUBackend
        return ThinKeyCPUBackend
    if current_platform.is_cuda_alike():
        from vllm.v1.attention.backends.triton_attn_diffkv import TritonAttentionDiffKVBackend
        TritonAttentionDiffKVBackend.set_head_size_v(head_size_v)
        return TritonAttentionDiffKVBackend
    raise RuntimeError(f"FactorKV has no thin-key attention backend for platform "
                       f"{current_platform.device_name!r}")
