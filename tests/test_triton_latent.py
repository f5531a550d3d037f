"""The Triton decode kernel for RoPE-exact latent keys (engine/attention/triton_latent.py).

Without a GPU the kernel runs under TRITON_INTERPRET=1 in a child process (the variable has
to be set before triton.jit decorates the kernel) on CPU tensors; with CUDA the compiled
kernel runs on the same cases. Both are compared with the plain-torch reference, which is
itself checked against a literal per-token loop.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import pytest
import torch

from loadtests.triton_latent_bench import rope_tables
from tests.engine_utils import ROOT

pytest.importorskip("triton", reason="triton is not installed")

D, R = 16, 4
# H, H_kv, G, block size, sequence lengths (1, block multiples and non-multiples), dtypes
CASES: dict[str, dict] = {
    "gqa3_joint_bs16": dict(h=6, h_kv=3, groups=1, bs=16, lens=[1, 7, 16, 37]),
    "gqa3_perhead_bs5": dict(h=6, h_kv=3, groups=3, bs=5, lens=[1, 5, 12, 23]),
    "gqa2_joint_bs5_out": dict(h=6, h_kv=2, groups=1, bs=5, lens=[3, 11, 1], out=True),
    "gqa2_perhead_bs32": dict(h=6, h_kv=2, groups=2, bs=32, lens=[1, 33, 40]),
    "mha4_two_groups_bs16": dict(h=4, h_kv=4, groups=2, bs=16, lens=[9, 20]),
    "bf16_cache_fp16_q": dict(h=6, h_kv=3, groups=1, bs=16, lens=[5, 19],
                              kv_dtype=torch.bfloat16, q_dtype=torch.float16),
    # an evicted cache: slot t holds the token at key_pos[s, t] (increasing, with gaps)
    "evicted_joint_bs16": dict(h=6, h_kv=3, groups=1, bs=16, lens=[1, 21, 40], key_pos=True),
    "evicted_perhead_bs5": dict(h=6, h_kv=2, groups=2, bs=5, lens=[9, 3], key_pos=True),
    "empty_and_long_bs16": dict(h=6, h_kv=3, groups=1, bs=16, lens=[0, 70, 2]),
}
SPLITS = (1, 3)   # one run per sequence, and flash-decoding runs (some of them empty)


def make_case(h, h_kv, groups, bs, lens, seed=0, d=D, r=R, kv_dtype=torch.float32,
              q_dtype=torch.float32, key_pos=False, **_):
    """Random inputs with a shuffled block table; every cache slot no live token uses is NaN."""
    g = torch.Generator().manual_seed(seed)
    n, r_g = len(lens), h_kv // groups * r
    nblk = [(n_tok + bs - 1) // bs for n_tok in lens]
    n_blocks = sum(nblk) + 3
    perm = torch.randperm(n_blocks, generator=g)
    bt = torch.randint(0, n_blocks, (n, max(nblk) + 1), generator=g, dtype=torch.int32)
    live = torch.zeros(n_blocks, bs, dtype=torch.bool)
    o = 0
    for i, (k, n_tok) in enumerate(zip(nblk, lens)):
        bt[i, :k] = perm[o:o + k]
        o += k
        t = torch.arange(n_tok)
        live[bt[i, t // bs].long(), t % bs] = True
    kv = torch.randn(n_blocks, h_kv, bs, r + d, generator=g)
    kv.transpose(1, 2)[~live] = float("nan")
    extra = {}
    top = max(lens) + 3
    if key_pos:
        gaps = torch.randint(1, 4, (n, max(lens) + 1), generator=g)
        extra["key_pos"] = (gaps.cumsum(1) - 1).to(torch.int32)
        top = int(extra["key_pos"].max()) + 1
    cos, sin = rope_tables(top, d)
    return dict(q=torch.randn(n, h, d, generator=g).to(q_dtype), kv_cache=kv.to(kv_dtype),
                block_table=bt, seq_lens=torch.tensor(lens, dtype=torch.int32),
                up=torch.randn(h_kv, d, r_g, generator=g) / math.sqrt(r_g), cos=cos, sin=sin,
                scale=d ** -0.5, groups=groups, **extra)


def run_cases(device: str, splits=SPLITS) -> dict[str, float]:
    """Max |kernel - reference| per case and split count, keyed "case/splits" (NaN if the
    kernel's output is not finite)."""
    from engine.attention.triton_latent import latent_decode, latent_decode_reference
    errors = {}
    for name, case in CASES.items():
        args = {k: v.to(device) if isinstance(v, torch.Tensor) else v
                for k, v in make_case(**case).items()}
        ref = latent_decode_reference(**args)
        for n_split in splits:
            out = torch.full_like(args["q"], float("nan")) if case.get("out") else None
            got = latent_decode(**args, out=out, num_splits=n_split)
            assert out is None or got is out
            assert got.dtype == args["q"].dtype and got.shape == args["q"].shape
            err = (got.float() - ref.float()).abs().max().item()
            errors[f"{name}/{n_split}"] = err if torch.isfinite(got).all() else float("nan")
    return errors


def tolerance(key: str) -> float:
    name = key.split("/")[0]
    return 5e-3 if CASES[name].get("q_dtype", torch.float32) != torch.float32 else 1e-4


@pytest.fixture(scope="module")
def interpreted_errors() -> dict[str, float]:
    env = dict(os.environ, TRITON_INTERPRET="1")
    code = ("import json; from tests.test_triton_latent import run_cases; "
            "print('ERRORS', json.dumps(run_cases('cpu')))")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ERRORS "))
    print(f"interpreter run: {time.monotonic() - start:.1f} s")
    return json.loads(line.split(" ", 1)[1])


@pytest.mark.parametrize("key", [f"{name}/{n}" for name in CASES for n in SPLITS])
def test_interpreted_kernel_matches_reference(interpreted_errors, key):
    assert interpreted_errors[key] <= tolerance(key), interpreted_errors


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_kernel_matches_reference_on_cuda():
    errors = run_cases("cuda", splits=(None, *SPLITS))
    assert all(err <= tolerance(key) for key, err in errors.items()), errors


def literal(q, kv_cache, block_table, seq_lens, up, cos, sin, scale, groups):
    """One query head, one token at a time, in float64, straight from the definitions."""
    n, h, d = q.shape
    h_kv, bs = kv_cache.shape[1], kv_cache.shape[2]
    r, m, half = kv_cache.shape[-1] - d, h_kv // groups, d // 2
    out = torch.zeros(n, h, d, dtype=torch.float64)
    for s in range(n):
        for j in range(h):
            kvh = j // (h // h_kv)
            grp = kvh // m
            scores, values = [], []
            for t in range(int(seq_lens[s])):
                blk, off = int(block_table[s, t // bs]), t % bs
                c = torch.cat([kv_cache[blk, grp * m + i, off, :r] for i in range(m)]).double()
                k = up[kvh].double() @ c
                rot = torch.empty(d, dtype=torch.float64)
                for i in range(half):
                    rot[i] = k[i] * cos[t, i] - k[i + half] * sin[t, i]
                    rot[i + half] = k[i + half] * cos[t, i + half] + k[i] * sin[t, i + half]
                scores.append(scale * float(q[s, j].double() @ rot))
                values.append(kv_cache[blk, kvh, off, r:].double())
            top = max(scores)
            w = [math.exp(x - top) for x in scores]
            out[s, j] = sum(wi / sum(w) * v for wi, v in zip(w, values))
    return out


@pytest.mark.parametrize("groups", [1, 2])
def test_reference_matches_literal_loop(groups):
    from engine.attention.triton_latent import latent_decode_reference
    args = make_case(h=4, h_kv=2, groups=groups, bs=3, lens=[1, 5, 7], d=8, r=2, seed=1)
    g = torch.Generator().manual_seed(2)     # a general table: the two halves differ
    args["cos"], args["sin"] = torch.rand(10, 8, generator=g), torch.rand(10, 8, generator=g)
    ref = latent_decode_reference(**args)
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(ref.double(), literal(**args), atol=1e-5, rtol=1e-5)


def test_rejects_bad_splits_and_precision():
    from engine.attention.triton_latent import latent_decode
    args = make_case(h=6, h_kv=3, groups=1, bs=4, lens=[2])
    with pytest.raises(ValueError, match="num_splits"):
        latent_decode(**args, num_splits=0)
    with pytest.raises(ValueError, match="precision"):
        latent_decode(**args, precision="bf16x9")


def test_reference_rejects_bad_shapes():
    from engine.attention.triton_latent import latent_decode_reference
    args = make_case(h=6, h_kv=3, groups=1, bs=4, lens=[2])
    with pytest.raises(ValueError, match="groups"):
        latent_decode_reference(**dict(args, groups=2))
    with pytest.raises(ValueError, match="up is"):
        latent_decode_reference(**dict(args, up=args["up"][..., :-1]))


def test_device_benchmark_smoke(tmp_path):
    """The prepared GPU check (loadtests/triton_latent_bench.py) runs end to end on CPU under
    the interpreter, split-K included, and writes a report whose rows match the reference;
    without --smoke and without CUDA it refuses in one line, exit 2."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "loadtests.triton_latent_bench"]
    proc = subprocess.run([*cmd, "--smoke", "--out", str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads((tmp_path / "triton-latent.json").read_text())["rows"]
    assert row["splits"] == 3 and row["max_abs_err"] < 1e-4 and row["max_abs_err_splits1"] < 1e-4
    assert row["max_abs_err_tf32"] < 1e-2
    assert "| smollm2-135m | 2 | 40 | 3 |" in (tmp_path / "triton-latent.md").read_text()
    if not torch.cuda.is_available():
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
