"""Training-free initialisation of thin (rank-r) query/key projections, data-aware.

For one KV head with key rows W_k (D × hidden) and the query rows W_q^g of its G query
heads, and the calibration second moment of the attention input C_x = E[x xᵀ]:

    C_k = W_k C_x W_kᵀ,   C_q = Σ_g W_q^g C_x W_q^gᵀ          (D × D, pre-RoPE)

Whitened SVD ("data-aware"): with C_q = L_q L_qᵀ, C_k = L_k L_kᵀ and M = L_qᵀ L_k = P Σ Rᵀ,

    U = L_q^{-T} P_s Σ_s^{1/2},   Vᵀ = Σ_s^{1/2} R_sᵀ L_k^{-1}

minimises E[(qᵀ (I - U Vᵀ) k)²] over independent queries and keys: the score error
where the model operates, not ‖W_k - A B‖. Thin keys are Vᵀ W_k x, thin queries Uᵀ W_q x.

Methods (each returns per-layer thin q/k weights and a RoPE frequency table):
  truncated     whitened SVD of all D dims to r; the thin pairs get the paper's reduced
                table base^(-2j/r) (not exact under RoPE; needs calibration)
  best-pairs    keep the r/2 rotary pairs with the largest expected score energy
                tr(C_q,p C_k,p); exact under RoPE for the kept pairs
  partial-rope  keep n pairs exactly and compress the slowly rotating (low-frequency)
                pairs with the whitened SVD into r - 2n position-free dims (frequency 0);
                n is chosen per head to minimise the estimated score error
Models without RoPE (GPT-2): the whitened SVD of all D dims (exact when W_qᵀW_k has rank ≤ r).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

METHODS = ("truncated", "best-pairs", "partial-rope")
# Pairs whose angle grows by less than this over NOPE_HORIZON tokens are "slow": treating them
# as unrotated costs little, so partial-rope may compress them.
NOPE_MAX_ANGLE = 1.0
NOPE_HORIZON = 4096


@dataclass
class HeadInit:
    """One KV head's thin factors in head-dim space: thin query = uᵀ q, thin key = vt k.

    u [D, r], vt [r, D]; inv_freq [r/2] is the RoPE table of the thin pairs (None: no RoPE)."""
    u: torch.Tensor
    vt: torch.Tensor
    inv_freq: torch.Tensor | None


def _chol(c: torch.Tensor) -> torch.Tensor:
    eps = 1e-6 * c.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(c + eps * torch.eye(c.shape[0], dtype=c.dtype))


def whitened_factors(cq: torch.Tensor, ck: torch.Tensor, s: int
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """U [n, s], Vt [s, n] minimising E[(qᵀ(I - U Vt) k)²]; also the singular values of M."""
    lq, lk = _chol(cq), _chol(ck)
    p, sig, rt = torch.linalg.svd(lq.T @ lk)
    root = sig[:s].sqrt()
    u = torch.linalg.solve_triangular(lq.T, p[:, :s] * root, upper=True)
    vt = torch.linalg.solve_triangular(lk.T, rt[:s].T * root, upper=True).T
    return u, vt, sig


def pair_energy(cq: torch.Tensor, ck: torch.Tensor) -> torch.Tensor:
    """Expected squared score contribution of each rotary pair j (dims j, j + D/2): tr(C_q,p C_k,p)."""
    half = cq.shape[0] // 2
    out = torch.empty(half, dtype=cq.dtype)
    for j in range(half):
        idx = torch.tensor([j, j + half])
        out[j] = torch.trace(cq[idx][:, idx] @ ck[idx][:, idx])
    return out


def _selection(d: int, dims: list[int]) -> torch.Tensor:
    """[D, len(dims)] 0/1 matrix picking head dims."""
    m = torch.zeros(d, len(dims), dtype=torch.float64)
    m[dims, torch.arange(len(dims))] = 1.0
    return m


def head_moments(wq: torch.Tensor, wk: torch.Tensor, cx: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """C_q (summed over the group's query heads) and C_k in head-dim space (pre-RoPE)."""
    wq, wk, cx = wq.double(), wk.double(), cx.double()
    ck = wk @ cx @ wk.T
    cq = sum(wq[i] @ cx @ wq[i].T for i in range(wq.shape[0]))
    return cq, ck


def init_head(cq: torch.Tensor, ck: torch.Tensor, rank: int, method: str,
              inv_freq: torch.Tensor | None, rope_base: float | None) -> HeadInit:
    """Thin factors of one KV head from its pre-RoPE query/key second moments (D × D)."""
    d = cq.shape[0]
    if inv_freq is None:                                   # no RoPE: whitened SVD, exact algebra
        u, vt, _ = whitened_factors(cq, ck, rank)
        return HeadInit(u, vt, None)
    half = d // 2
    inv_freq = inv_freq.double()
    if method == "truncated":
        u, vt, _ = whitened_factors(cq, ck, rank)
        table = rope_base ** (-torch.arange(0, rank, 2, dtype=torch.float64) / rank)
        return HeadInit(u, vt, table)
    energy = pair_energy(cq, ck)
    if method == "best-pairs":
        js = sorted(energy.topk(rank // 2).indices.tolist())
        sel = _selection(d, js + [j + half for j in js])
        return HeadInit(sel, sel.T.clone(), inv_freq[js])
    if method != "partial-rope":
        raise ValueError(f"unknown init method {method!r}; choose from {METHODS}")
    slow = {j for j in range(half) if inv_freq[j] * NOPE_HORIZON < NOPE_MAX_ANGLE}
    ranked = sorted(range(half), key=lambda j: -energy[j])
    best = None
    for n in range(min(rank // 2, half), -1, -1):       # ties go to more exact pairs
        keep = ranked[:n]
        pool = sorted(slow - set(keep))
        s = rank - 2 * n
        if s > 2 * len(pool):
            continue
        err = float(sum(energy[j] for j in ranked[n:] if j not in slow))
        if pool:
            dims = pool + [j + half for j in pool]
            sig = whitened_factors(cq[dims][:, dims], ck[dims][:, dims], 1)[2]
            err += float((sig[s:] ** 2).sum())
        if best is None or err < best[0] * (1 - 1e-9):
            best = (err, sorted(keep), s, pool)
    _, keep, s, slow_pool = best
    pool = slow_pool + [j + half for j in slow_pool]
    # thin layout [kept first halves | nope a | kept second halves | nope b]: rotate_half pairs
    # thin dim i with i + r/2, so kept pairs rotate and the nope dims get frequency 0.
    n = len(keep)
    u = torch.zeros(d, rank, dtype=torch.float64)
    vt = torch.zeros(rank, d, dtype=torch.float64)
    hr = rank // 2
    for i, j in enumerate(keep):
        u[j, i] = vt[i, j] = 1.0
        u[j + half, hr + i] = vt[hr + i, j + half] = 1.0
    if s:
        pu, pvt, _ = whitened_factors(cq[pool][:, pool], ck[pool][:, pool], s)
        a = s // 2                                   # s is even: rank and 2n are
        cols = list(range(n, n + a)) + list(range(hr + n, hr + n + a))
        u[torch.tensor(pool)[:, None], torch.tensor(cols)[None, :]] = pu
        vt[torch.tensor(cols)[:, None], torch.tensor(pool)[None, :]] = pvt
    freqs = torch.zeros(hr, dtype=torch.float64)
    freqs[:n] = inv_freq[keep]
    return HeadInit(u, vt, freqs)
