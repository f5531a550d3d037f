"""Two training-free probes of where latent keys lose quality (quick checks, not benchmarks).

    python -m loadtests.latent_probes [--rank 16] [--windows 8] [--texts evaluation,news]

1. **Key mean.** A key bias after the reconstruction (k = B c + μ, free in the cache) would
   let the latent spend no dimension on the keys' mean. Per layer, with the pre-RoPE key
   moments from the attention inputs' [x; 1] moments (activation_stats, ``augment``),
   C_k = W_K C_x W_Kᵀ and μ = W_K E[x], the share of key energy a rank-r_L latent misses is
   Σ_{j>r_L} λ_j(C_k) / tr C_k uncentred (today's PCA) and Σ_{j>r_L} λ_j(C_k − μμᵀ) / tr C_k
   with the mean added back exactly.
2. **Per-layer latent widths.** vLLM 0.32 pages layers of different key widths under one block
   table (``UniformTypeKVCacheSpecs``), so the same KV bytes per token could be spent
   unevenly: r_l per KV head with Σ_l r_l = L·R. :func:`allocate_ranks` picks the r_l that
   minimise Σ_l (the spectrum's tail beyond H_kv·r_l), exactly (dynamic programme), over the
   widths the fused q/latent/v projection allows (r_l divides H·D); spectra: the keys'
   energy share (``keyfrac``) or the query-weighted score error (``score``, latent_init's
   ``qpca`` metric). Each allocation is initialised with plain PCA and its perplexity
   measured like :mod:`loadtests.init_ppl` (plain torch, the first windows × 512 tokens).

Results and the reading of them: docs/results/latent-ladder.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from engine.checkpoint import FactoredKeysConfig, model_dims
from loadtests.init_ppl import ppl
from model_patches.conversion.activation_stats import input_moments
from model_patches.conversion.checkpoint_writer import read_source, write_factored, write_full_rank
from model_patches.conversion.latent_init import (init_latent_state, latent_rotary_table,
                                                  query_metrics, weighted_key_moment)
from model_patches.text_sets import token_stream


def tail_shares(eigenvalues: torch.Tensor, total: float, dims: int) -> float:
    """Share of `total` in the eigenvalues beyond the top `dims` (descending or not)."""
    return eigenvalues.sort(descending=True).values[dims:].clamp_min(0).sum().item() / total


def key_mean_shares(wk: torch.Tensor, cx1: torch.Tensor, dims: int) -> tuple[float, float]:
    """(missed key energy uncentred, with the mean restored) at a `dims`-dim latent, from
    the [x; 1] moment cx1 (hidden + 1 square) and key rows wk [rows, hidden]."""
    cx, mx = cx1[:-1, :-1].double(), cx1[:-1, -1].double()
    wk = wk.double()
    ck, mu = wk @ cx @ wk.T, wk @ mx
    total = ck.trace().item()
    return (tail_shares(torch.linalg.eigvalsh(ck), total, dims),
            tail_shares(torch.linalg.eigvalsh(ck - torch.outer(mu, mu)), total, dims))


def allocate_ranks(spectra: list[torch.Tensor], budget: int, allowed: list[int],
                   kv_heads: int) -> list[int]:
    """Per-layer ranks r_l ∈ allowed with Σ r_l ≤ budget minimising Σ_l Σ_{j ≥ H_kv·r_l}
    spectra[l][j] (each spectrum descending), by dynamic programming over the budget."""
    inf = float("inf")
    cost = [[s[kv_heads * r:].sum().item() for r in allowed] for s in spectra]
    best, back = [0.0] + [inf] * budget, []
    for layer_cost in cost:
        nxt, arg = [inf] * (budget + 1), [None] * (budget + 1)
        for used, c in enumerate(best):
            if c == inf:
                continue
            for r, tail in zip(allowed, layer_cost):
                if used + r <= budget and c + tail < nxt[used + r]:
                    nxt[used + r], arg[used + r] = c + tail, (used, r)
        best = nxt
        back.append(arg)
    used = min(range(budget + 1), key=best.__getitem__)
    if best[used] == inf:
        raise ValueError(f"no allocation of {len(spectra)} layers fits a budget of {budget}")
    ranks = []
    for arg in reversed(back):
        used, r = arg[used]
        ranks.append(r)
    return ranks[::-1]


def spectrum(m: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a symmetric PSD matrix, descending, rounding negatives clamped to 0."""
    return torch.linalg.eigvalsh(m).flip(0).clamp_min(0)


def layer_spectra(cfg: dict, sd: dict[str, torch.Tensor], moments: list[torch.Tensor]
                  ) -> dict[str, list[torch.Tensor]]:
    """Per layer, descending: the key energy share (``keyfrac``) and the query-weighted
    score-error spectrum (``score``) of the joint latent (latent_init's two key moments)."""
    n_layers, h, h_kv, d, _ = model_dims(cfg)
    out: dict[str, list[torch.Tensor]] = {"keyfrac": [], "score": []}
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn"
        wk = sd[f"{p}.k_proj.weight"]
        metric = torch.block_diag(*query_metrics(sd[f"{p}.q_proj.weight"].view(h, d, -1), wk,
                                                 moments[i], h_kv))
        ek = spectrum(weighted_key_moment(wk, moments[i])[2])
        out["keyfrac"].append(ek / ek.sum())
        out["score"].append(spectrum(weighted_key_moment(wk, moments[i], metric)[2]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=16, help="mean latent dims per KV head (R)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--texts", default="evaluation,news")
    ap.add_argument("--work", default="/tmp/factorkv-latent-probes")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from model_patches.conversion.default_model import prepare_default_model
    src, out = prepare_default_model(), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    cfg, sd, fam = read_source(src)
    n_layers, h, h_kv, d, _ = model_dims(cfg)

    print(f"## Key mean (latent of {h_kv * args.rank} dims): missed key energy per layer")
    aug = input_moments(src, 32 * 512, progress=False, augment=True)
    shares = [key_mean_shares(sd[f"model.layers.{i}.self_attn.k_proj.weight"], aug[i],
                              h_kv * args.rank) for i in range(n_layers)]
    med = [sorted(x[j] for x in shares)[n_layers // 2] for j in (0, 1)]
    lo, hi = (f(range(n_layers), key=lambda i: shares[i][0]) for f in (min, max))
    print(f"median over layers: uncentred {med[0]:.4f}, mean restored {med[1]:.4f}; uncentred "
          f"from {shares[lo][0]:.4f} (layer {lo}) to {shares[hi][0]:.4f} (layer {hi})\n",
          flush=True)

    moments = [m[:-1, :-1] for m in aug]
    spectra = layer_spectra(cfg, sd, moments)
    allowed = [r for r in range(1, d + 1) if (h * d) % r == 0]
    allocations = {"uniform": [args.rank] * n_layers}
    allocations.update({k: allocate_ranks(v, args.rank * n_layers, allowed, h_kv)
                        for k, v in spectra.items()})
    tok = AutoTokenizer.from_pretrained(src)
    texts = args.texts.split(",")
    ev = {t: torch.tensor(token_stream(tok, t)[: args.windows * 512]).view(-1, 512) for t in texts}
    if not (out / "full").exists():
        write_full_rank(src, out / "full")
    base = {t: ppl(out / "full", w) for t, w in ev.items()}
    table, scaling = latent_rotary_table(cfg)
    print("## Per-layer latent widths (plain PCA, training-free)\n")
    print(f"| allocation | r_l per layer | {' | '.join(f'{t} PPL' for t in texts)} |")
    print(f"|---|---|{'---:|' * len(texts)}")
    print(f"| original | - | {' | '.join(f'{base[t]:.3f}' for t in texts)} |", flush=True)
    for name, ranks in allocations.items():
        state = init_latent_state(cfg, sd, ranks, 1, moments, progress=False,
                                  query_weighted=False)
        fk = FactoredKeysConfig.build(cfg, ranks, table, method=f"pca-{name}",
                                      source_model=src.name, rotary_attention_scaling=scaling,
                                      key_mode="latent")
        dst = write_factored(src, out / name, cfg=cfg, family=fam, state=state, fk=fk,
                             force=True)
        cells = [f"{p:.3f} ({100 * (p / base[t] - 1):+.1f} %)"
                 for t, p in ((t, ppl(dst, w)) for t, w in ev.items())]
        print(f"| {name} | {','.join(map(str, ranks))} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
