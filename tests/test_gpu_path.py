"""The GPU path of factored models, checked without a GPU.

On CUDA, factored models use vLLM's TRITON_ATTN_DIFFKV (engine.attention.selector). Its
Triton kernels run here under TRITON_INTERPRET=1 on FactorKV's packed cache layout with
r < D (tests/_triton_diffkv_check.py). A real-GPU smoke test runs only where CUDA exists.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.engine_utils import ROOT


def test_triton_diffkv_kernels_match_reference_under_interpreter():
    proc = subprocess.run([sys.executable, "tests/_triton_diffkv_check.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("ok ") == 4


def test_cpu_platform_selects_factorkv_backend():
    from engine.attention.cpu_backend import ThinKeyCPUBackend
    from engine.attention.selector import thin_key_backend
    from vllm.platforms import current_platform
    if not current_platform.is_cpu():
        pytest.skip("not a CPU vLLM build")
    assert thin_key_backend(64) is ThinKeyCPUBackend


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_factored_model_on_gpu(tmp_path):
    from engine.torch_model import TorchCausalLM
    from model_patches.conversion.checkpoint_writer import write_rotary_pair_subset
    from tests.engine_utils import run_vllm, tiny_llama
    thin = write_rotary_pair_subset(tiny_llama(tmp_path / "src"), tmp_path / "thin", 8)
    prompt = list(range(3, 60))
    out = run_vllm(thin, [[{"prompt": prompt, "max_tokens": 8}]], tmp_path,
                   kv_cache_memory_bytes=64 << 20)
    ref = TorchCausalLM.from_dir(thin)(torch.tensor(prompt + out["rounds"][0][0]["tokens"]))
    assert out["rounds"][0][0]["tokens"] == ref[len(prompt) - 1:-1].argmax(-1).tolist()
