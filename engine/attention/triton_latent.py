"""Decode attention over a paged cache of RoPE-exact latent keys (DESIGN 1.1b), in Triton.

Cache, per layer: kv_cache [num_blocks, H_kv, BS, r + D]; token t of sequence s lives in block
block_table[s, t // BS] at offset t % BS; slot h holds [latent slot h (r dims) | value v_h].
With G groups and m = H_kv / G, group g's latent is c_g = concat(slots g·m .. g·m + m - 1)
(r_g = m·r dims), and KV head h's key at position t is

    k_h(t) = rope(up[h] @ c_{h // m}(t), t),   rope(x, t) = x·cos[t] + rotate_half(x)·sin[t],
    rotate_half(x) = cat(-x[D/2:], x[:D/2])                         (HF / NeoX convention)

Query head j (q already rotated at its own position) reads KV head j // (H / H_kv):

    out[s, j] = Σ_{t < seq_lens[s]} softmax_t(scale · q[s, j] · k_h(t)) · v_h(t).

An evicted (compacted) cache passes key_pos: slot t of sequence s then holds the token at
position key_pos[s, t], and its key is rotated there. Small batches split each sequence's
blocks into runs computed in parallel, each run's (max, sum, unnormalised output) combined by a
second kernel (flash-decoding), so that n · H_kv programs do not leave most of a GPU idle.

`latent_decode` is the Triton kernel (one query token per sequence); `latent_decode_reference`
is the same in plain, vectorised torch and is the kernel's test oracle.

Prefill needs no kernel of its own: on CUDA it takes the torch path (reconstruct the keys of
all prompt tokens with one batched matmul against `up`, rotate them, then SDPA), where the
reconstruction is a small share of the prompt's attention FLOPs.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from engine.rotary import rotate_half

MIN_TILE = 16  # tl.dot needs every tile dimension >= 16 on GPUs
SPLIT_MIN_BLOCKS = 4  # a split-K run covers at least this many blocks
MAX_SPLITS = 64
PRECISIONS = ("ieee", "tf32")


def _shapes(q, kv_cache, up, groups: int) -> tuple[int, int, int, int, int, int]:
    """Validate the arguments; return (H, H_kv, D, r, m, r_g)."""
    n, h, d = q.shape
    _, h_kv, _, width = kv_cache.shape
    r = width - d
    if d % 2 or r < 1 or h % h_kv or groups < 1 or h_kv % groups:
        raise ValueError(f"bad shapes: q {tuple(q.shape)}, kv_cache {tuple(kv_cache.shape)}, "
                         f"groups {groups} (need even D, r >= 1, H_kv | H, G | H_kv)")
    m = h_kv // groups
    if tuple(up.shape) != (h_kv, d, m * r):
        raise ValueError(f"up is {tuple(up.shape)}, expected {(h_kv, d, m * r)}")
    return h, h_kv, d, r, m, m * r


def latent_decode_reference(q, kv_cache, block_table, seq_lens, up, cos, sin, scale: float,
                            groups: int, out=None, key_pos=None) -> torch.Tensor:
    """Plain torch (fp32): gather the cached rows, reconstruct k = up[h] @ c, rotate, softmax.

    Keys are rotated at their slot index t, or at key_pos[s, t] ([n, >= T] ints: the token
    positions of a cache compacted by eviction). Rows at t >= seq_lens[s] are zeroed before
    use, so garbage (even NaN) there is ignored; an empty sequence gives zeros."""
    h, h_kv, d, r, m, r_g = _shapes(q, kv_cache, up, groups)
    n, bs = q.shape[0], kv_cache.shape[2]
    lens = seq_lens.long()
    t_max = int(lens.max()) if n else 0
    t = torch.arange(t_max, device=q.device)
    valid = t[None, :] < lens[:, None]                                       # [n, T]
    blocks = block_table.long()[:, t // bs]                                  # [n, T]
    rows = kv_cache[blocks, :, (t % bs)[None, :]].float()                   # [n, T, H_kv, r + D]
    rows = torch.where(valid[..., None, None], rows, torch.zeros((), device=q.device))
    latent = rows[..., :r].reshape(n, t_max, groups, r_g)                   # [n, T, G, r_g]
    latent = latent[:, :, torch.arange(h_kv, device=q.device) // m]         # [n, T, H_kv, r_g]
    keys = torch.einsum("hdc,nthc->nthd", up.float(), latent)
    at = t[None] if key_pos is None else key_pos.long()[:, :t_max].clamp(0, cos.shape[0] - 1)
    c, s = cos.float()[at][:, :, None], sin.float()[at][:, :, None]       # [n | 1, T, 1, D]
    keys = keys * c + rotate_half(keys) * s
    kv_of_q = torch.arange(h, device=q.device) // (h // h_kv)
    scores = torch.einsum("njd,ntjd->njt", q.float(), keys[:, :, kv_of_q]) * scale
    p = torch.softmax(scores.masked_fill(~valid[:, None], float("-inf")), -1).nan_to_num(0.0)
    res = torch.einsum("njt,ntjd->njd", p, rows[..., r:][:, :, kv_of_q]).to(q.dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


# Work per cached token and KV head (one decode step), for QPK = H / H_kv query heads per KV
# head: reconstruct D·r_g multiply-adds (two [BS, r_g] x [r_g, D/2] dots), RoPE ~3·D flops,
# QK QPK·D and PV QPK·D multiply-adds. Reconstruction dominates by r_g / (2·QPK): e.g.
# D = 64, H_kv = 3, QPK = 3, r = 16, G = 1 (r_g = 48) gives 3072 vs 384 MACs, 8x the attention
# itself. Bytes read per token and KV head: r_g latent values (the group's m programs each
# read the group's latent; the repeats hit L2) + D value entries; decode stays memory-bound
# for small r_g, and the recompute is what the smaller cache pays. Dots run in fp32 ("ieee",
# CUDA cores) by default; "tf32" puts them on tensor cores (10-bit mantissa inputs, fp32 sums):
# at ~38 flops per cached byte (the default model, bf16) fp32 CUDA cores, not memory, would
# bound an H200 (~14 flops per byte), tensor cores would not.
@triton.jit
def _latent_decode_kernel(q_ptr, kv_ptr, bt_ptr, lens_ptr, pos_ptr, up_ptr, cos_ptr, sin_ptr,
                          out_ptr, part_ptr, ml_ptr, scale_log2e, num_splits,
                          stride_qn, stride_qh, stride_kb, stride_kh, stride_kt, stride_bt,
                          stride_pos, stride_on, stride_oh,
                          R: tl.constexpr, D: tl.constexpr, RG: tl.constexpr, M: tl.constexpr,
                          QPK: tl.constexpr, BS: tl.constexpr, QP: tl.constexpr,
                          BSP: tl.constexpr, RGP: tl.constexpr, DHP: tl.constexpr,
                          DP: tl.constexpr, HAS_POS: tl.constexpr, PARTIAL: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Program (s, h, j): sequence s, KV head h and its QPK query heads, the j-th of num_splits
    equal runs of s's blocks. PARTIAL: write the run's unnormalised (acc, max, sum) for
    _combine_kernel; else (one run) write the normalised output."""
    s = tl.program_id(0)
    h = tl.program_id(1)
    j = tl.program_id(2)
    DH: tl.constexpr = D // 2
    seq_len = tl.load(lens_ptr + s)
    qi = tl.arange(0, QP)
    ti = tl.arange(0, BSP)
    ci = tl.arange(0, RGP)
    dh = tl.arange(0, DHP)
    dv = tl.arange(0, DP)
    dh_ok = dh < DH
    # the QPK query heads of KV head h, split in halves for rotate_half: [QP, DHP] each
    q_rows = q_ptr + s * stride_qn + (h * QPK + qi[:, None]) * stride_qh + dh[None, :]
    q_mask = (qi[:, None] < QPK) & dh_ok[None, :]
    q1 = tl.load(q_rows, mask=q_mask, other=0.0).to(tl.float32)
    q2 = tl.load(q_rows + DH, mask=q_mask, other=0.0).to(tl.float32)
    # up[h] transposed, halves of D: [RGP, DHP]  (up contiguous [H_kv, D, RG])
    u_rows = up_ptr + h * D * RG + ci[:, None] + dh[None, :] * RG
    u_mask = (ci[:, None] < RG) & dh_ok[None, :]
    u1 = tl.load(u_rows, mask=u_mask, other=0.0)
    u2 = tl.load(u_rows + DH * RG, mask=u_mask, other=0.0)
    # latent column c of group h // M: slot (h // M) * M + c // R, entry c % R
    lat_cols = ((h // M) * M + ci // R) * stride_kh + ci % R
    m_i = tl.full([QP], float("-inf"), tl.float32)
    l_i = tl.zeros([QP], tl.float32)
    acc = tl.zeros([QP, DP], tl.float32)
    n_blocks = tl.cdiv(seq_len, BS)
    per_split = tl.cdiv(n_blocks, num_splits)
    b_end = tl.minimum((j + 1) * per_split, n_blocks)
    for b in range(j * per_split, b_end):
        blk = tl.load(bt_ptr + s * stride_bt + b).to(tl.int64)
        slot = b * BS + ti
        t_ok = (ti < BS) & (slot < seq_len)
        if HAS_POS:   # an evicted (compacted) cache: slot t holds the token at key_pos[s, t]
            at = tl.load(pos_ptr + s * stride_pos + slot, mask=t_ok, other=0)
        else:
            at = slot
        rows = kv_ptr + blk * stride_kb + ti[:, None] * stride_kt
        lat = tl.load(rows + lat_cols[None, :], mask=t_ok[:, None] & (ci[None, :] < RG),
                      other=0.0).to(tl.float32)                              # [BSP, RGP]
        k1 = tl.dot(lat, u1, input_precision=PRECISION)                      # [BSP, DHP]
        k2 = tl.dot(lat, u2, input_precision=PRECISION)
        cs = at[:, None] * D + dh[None, :]
        cs_mask = t_ok[:, None] & dh_ok[None, :]
        r1 = (k1 * tl.load(cos_ptr + cs, mask=cs_mask, other=0.0)
              - k2 * tl.load(sin_ptr + cs, mask=cs_mask, other=0.0))
        r2 = (k2 * tl.load(cos_ptr + cs + DH, mask=cs_mask, other=0.0)
              + k1 * tl.load(sin_ptr + cs + DH, mask=cs_mask, other=0.0))
        sc = (tl.dot(q1, tl.trans(r1), input_precision=PRECISION)
              + tl.dot(q2, tl.trans(r2), input_precision=PRECISION)) * scale_log2e  # [QP, BSP]
        sc = tl.where(t_ok[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))       # finite: every block has a valid token
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(sc - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(rows + h * stride_kh + R + dv[None, :],
                    mask=t_ok[:, None] & (dv[None, :] < D), other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)   # [QP, DP]
        m_i = m_new
    q_ok = qi < QPK
    if PARTIAL:   # run j of query head (s, h·QPK + qi): part [n, H, S, D], ml [n, H, S, 2]
        row = (s * tl.num_programs(1) * QPK + h * QPK + qi) * num_splits + j
        tl.store(part_ptr + row[:, None] * D + dv[None, :], acc,
                 mask=q_ok[:, None] & (dv[None, :] < D))
        tl.store(ml_ptr + row * 2, m_i, mask=q_ok)
        tl.store(ml_ptr + row * 2 + 1, l_i, mask=q_ok)
    else:
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        o_rows = out_ptr + s * stride_on + (h * QPK + qi[:, None]) * stride_oh + dv[None, :]
        tl.store(o_rows, acc.to(out_ptr.dtype.element_ty),
                 mask=q_ok[:, None] & (dv[None, :] < D))


@triton.jit
def _combine_kernel(part_ptr, ml_ptr, out_ptr, num_splits, stride_on, stride_oh,
                    D: tl.constexpr, SP: tl.constexpr, DP: tl.constexpr):
    """Program (s, i): query head i of sequence s. With the runs' maxima m_j, sums l_j and
    unnormalised outputs a_j (base-2 logits): out = Σ_j 2^(m_j - m) a_j / Σ_j 2^(m_j - m) l_j,
    m = max_j m_j; empty runs (m_j = -inf) weigh 0, an empty sequence gives zeros."""
    s = tl.program_id(0)
    i = tl.program_id(1)
    si = tl.arange(0, SP)
    dv = tl.arange(0, DP)
    ok = si < num_splits
    row = (s * tl.num_programs(1) + i) * num_splits + si
    m_j = tl.load(ml_ptr + row * 2, mask=ok, other=float("-inf"))
    l_j = tl.load(ml_ptr + row * 2 + 1, mask=ok, other=0.0)
    m = tl.max(m_j, 0)
    w = tl.where(m_j > float("-inf"), tl.exp2(m_j - m), 0.0)
    a = tl.load(part_ptr + row[:, None] * D + dv[None, :], mask=ok[:, None] & (dv[None, :] < D),
                other=0.0)
    den = tl.sum(w * l_j, 0)
    o = tl.sum(w[:, None] * a, 0) / tl.where(den > 0, den, 1.0)
    tl.store(out_ptr + s * stride_on + i * stride_oh + dv, o.to(out_ptr.dtype.element_ty),
             mask=dv < D)


def _tile(x: int) -> int:
    return max(MIN_TILE, triton.next_power_of_2(x))


@functools.lru_cache(maxsize=None)
def _multiprocessors(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def default_splits(n: int, h_kv: int, max_blocks: int, device: torch.device) -> int:
    """Runs per (sequence, KV head) so that a small batch still fills the GPU: about two
    programs per multiprocessor, at least SPLIT_MIN_BLOCKS blocks per run of the longest
    possible sequence (block_table's width; no device sync), 1 off CUDA."""
    if device.type != "cuda" or n * h_kv == 0:
        return 1
    sms = _multiprocessors(device.index if device.index is not None else 0)
    want = -(-2 * sms // (n * h_kv))
    return max(1, min(want, -(-max_blocks // SPLIT_MIN_BLOCKS), MAX_SPLITS))


def latent_decode(q, kv_cache, block_table, seq_lens, up, cos, sin, scale: float, groups: int,
                  out=None, key_pos=None, num_splits: int | None = None,
                  precision: str = "ieee") -> torch.Tensor:
    """Decode attention (one query token per sequence) with latent keys, as the module states.

    q [n, H, D] (fp32/fp16/bf16); kv_cache [NB, H_kv, BS, r + D] (fp32/fp16/bf16);
    block_table [n, max_blocks] int32; seq_lens [n] int32; up [H_kv, D, r_g];
    cos, sin [max_pos, D]; key_pos: None (slot t holds position t) or int [n, >= T] (an
    evicted cache's token positions, < max_pos); num_splits: runs of each sequence's blocks
    computed in parallel then combined (flash-decoding; None: default_splits); precision: the
    dots' input precision, "ieee" (fp32) or "tf32" (tensor cores). Returns out [n, H, D] in
    q's dtype. Accumulation is fp32."""
    h, h_kv, d, r, m, r_g = _shapes(q, kv_cache, up, groups)
    n, bs = q.shape[0], kv_cache.shape[2]
    if q.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q and kv_cache need a contiguous last dimension")
    if out is None:
        out = torch.empty_like(q)
    elif tuple(out.shape) != tuple(q.shape) or out.stride(-1) != 1:
        raise ValueError(f"out is {tuple(out.shape)}, expected {tuple(q.shape)}, last dim unit")
    up = up.float().contiguous()
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    block_table = block_table.to(torch.int32)
    if block_table.stride(-1) != 1:
        block_table = block_table.contiguous()
    seq_lens = seq_lens.to(torch.int32).contiguous()
    if key_pos is not None:
        key_pos = key_pos.to(torch.int32)
        if key_pos.stride(-1) != 1:
            key_pos = key_pos.contiguous()
    if n == 0:
        return out
    splits = (default_splits(n, h_kv, block_table.shape[1], q.device) if num_splits is None
              else int(num_splits))
    if splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    qpk = h // h_kv
    part = ml = out                                  # unused placeholders when splits == 1
    if splits > 1:
        part = torch.empty(n, h, splits, d, dtype=torch.float32, device=q.device)
        ml = torch.empty(n, h, splits, 2, dtype=torch.float32, device=q.device)
    pos = seq_lens if key_pos is None else key_pos   # placeholder pointer when HAS_POS is off
    _latent_decode_kernel[(n, h_kv, splits)](
        q, kv_cache, block_table, seq_lens, pos, up, cos, sin, out, part, ml,
        scale * 1.4426950408889634,  # log2(e): the softmax runs in base 2
        splits, q.stride(0), q.stride(1), kv_cache.stride(0), kv_cache.stride(1),
        kv_cache.stride(2), block_table.stride(0), 0 if key_pos is None else key_pos.stride(0),
        out.stride(0), out.stride(1),
        R=r, D=d, RG=r_g, M=m, QPK=qpk, BS=bs, QP=_tile(qpk), BSP=_tile(bs), RGP=_tile(r_g),
        DHP=_tile(d // 2), DP=_tile(d), HAS_POS=key_pos is not None, PARTIAL=splits > 1,
        PRECISION=precision)
    if splits > 1:
        _combine_kernel[(n, h)](part, ml, out, splits, out.stride(0), out.stride(1),
                                D=d, SP=max(2, triton.next_power_of_2(splits)),
                                DP=triton.next_power_of_2(d))
    return out
