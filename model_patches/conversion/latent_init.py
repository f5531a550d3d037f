"""Training-free initialisation of RoPE-exact latent keys: query-weighted PCA of the pre-RoPE keys.

For one latent group of a layer (the m = H_kv / G consecutive KV heads that share a latent),
with the group's key rows W_K,g ((m·D) × hidden, pre-RoPE), the calibration second moment of
the attention input C_x (activation_stats.input_moments, attention-weighted for the converter)
and a PSD metric M on the group's key space, find the rank-s (s = m·r) latent k̂ = B_g A_g x
with the least E[(k − k̂)ᵀ M (k − k̂)]:

    S = M^{1/2},   S W_K,g C_x W_K,gᵀ S = U Λ Uᵀ          (eigenvalues descending)
    A_g = U_sᵀ S W_K,g   (latent projection)     B_g = S^{-1} U_s   (key reconstruction)

expressed in the latent basis where B_g has orthonormal columns (S^{-1} U_s = Q R:
B_g = Q, A_g = R U_sᵀ S W_K,g; the same k̂, with the scales plain PCA gives calibration).

  query-weighted (``--init qpca``): M = blockdiag_h(C_q,h), C_q,h = Σ_{i in h} W_q,i C_x
      W_q,iᵀ the pre-RoPE query moment of KV head h's query heads, so the criterion is the
      expected squared score error E[(qᵀ(k − k̂))²] over independent queries and keys. RoPE's
      rotation between the query's and the key's positions is left out (Δ = 0): averaging
      the metric over Δ uniform in [0, 2048) was measured worse (docs/methods.md);
  PCA (``--init pca``, the default): M = I, k̂ = U_s U_sᵀ k, the least E‖k − k̂‖².

``-attn`` (``pca-attn``, ``qpca-attn``): C_x weighted per token by sqrt(attention it receives).
Measured on the default model (docs/results/latent-ladder.md): ``qpca-attn`` starts much closer
to the source (R = 16: +16 % vs +26 % perplexity) but after the shipped calibration recipe it
retrieved passkeys worse (26 % vs 54 % at 2k tokens), so plain PCA stays the default.

At s = m·D both are exact (A_g = U ᵀ S W_K,g, B_g A_g = W_K,g). Keys are then rotated with the
source's full-width RoPE at their own positions, so the only approximation is k ≈ k̂. A source
key bias b becomes the latent bias U_sᵀ S b.

Checkpoint tensors per layer (docs/checkpoint-format.md, key_mode "latent"): k_proj = A
(groups stacked, [H_kv·r, hidden]), k_up_proj = B (groups stacked by rows, [H_kv·D, m·r]);
q_proj, v_proj unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from engine.checkpoint import FactoredKeysConfig, model_dims
from engine.rotary import source_inv_freq
from engine.weights import load_checkpoint
from model_patches.conversion.thin_init import head_moments

#: Latent-key initialisations (``--init``): plain / query-weighted PCA, optionally on
#: attention-weighted input moments (module docstring). The first is the default.
LATENT_INITS = ("pca", "qpca", "pca-attn", "qpca-attn")


def init_options(init: str) -> tuple[bool, bool]:
    """(attention-weighted input moments, query-weighted metric) of a LATENT_INITS name."""
    return init.endswith("-attn"), init.startswith("qpca")


def psd_sqrt(m: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(M^{1/2}, M^{-1/2}) of a symmetric PSD matrix, eigenvalues floored at floor·max."""
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    vals = vals.clamp_min(vals.max() * floor)
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


def query_metrics(wq: torch.Tensor, wk: torch.Tensor, cx: torch.Tensor,
                  kv_heads: int) -> list[torch.Tensor]:
    """Per KV head h, the score-error metric C_q,h = Σ_{query heads i of h} W_Q,i C_x W_Q,iᵀ
    (D × D, thin_init.head_moments) from q rows wq [H, D, hidden] and key rows wk [H_kv·D, hidden]."""
    per, d = wq.shape[0] // kv_heads, wq.shape[1]
    return [head_moments(wq[h * per:(h + 1) * per], wk[h * d:(h + 1) * d], cx)[0]
            for h in range(kv_heads)]


def weighted_key_moment(wk: torch.Tensor, cx: torch.Tensor, metric: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(S, S⁻¹, S W_K C_x W_Kᵀ S) in float64, S = metric^{1/2} (identity when None): the key
    moment whose top eigenvectors span the latent that minimises the metric's error."""
    wk = wk.double()
    if metric is None:
        s = s_inv = torch.eye(wk.shape[0], dtype=torch.float64)
    else:
        s, s_inv = psd_sqrt(metric.double())
    return s, s_inv, s @ wk @ cx.double() @ wk.T @ s


def latent_group_factors(wk: torch.Tensor, cx: torch.Tensor, dims: int,
                         metric: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(P [dims, rows], B [rows, dims]) for key rows wk [rows, hidden], input moment cx and the
    key-space metric (None: identity): the latent is P k (A = P wk), the rebuilt key B P k."""
    s, s_inv, ck = weighted_key_moment(wk, cx, metric)
    _, vecs = torch.linalg.eigh((ck + ck.T) / 2)
    u = vecs.flip(-1)[:, :dims]                       # top `dims` principal directions
    # Same k̂ in the latent basis where B has orthonormal columns (B = Q R: B' = Q, P' = R P),
    # as plain PCA's: A and B keep the scales of W_K and of an orthonormal basis, which is
    # what calibration's Adam steps (absolute step sizes) are tuned for.
    q, r = torch.linalg.qr(s_inv @ u)
    return r @ u.T @ s, q


def init_latent_state(cfg: dict, sd: dict[str, torch.Tensor], rank: int | Sequence[int],
                      groups: int, moments: list[torch.Tensor], progress: bool = True,
                      query_weighted: bool = True) -> dict[str, torch.Tensor]:
    """New state dict with latent key projections (k_proj = A, k_up_proj = B) for every layer
    of a Llama-family source: ``rank`` latent dims per KV head (one int, or one per layer),
    ``groups`` latents per layer; query_weighted: the score-error metric (module docstring),
    else plain PCA."""
    n_layers, n_heads, h_kv, d, _ = model_dims(cfg)
    ranks = [rank] * n_layers if isinstance(rank, int) else list(rank)
    m = h_kv // groups
    state = dict(sd)
    for i in tqdm(range(n_layers), desc=f"latent init (r={rank}, groups={groups})",
                  unit="layer", disable=not progress):
        p = f"model.layers.{i}.self_attn"
        wk = sd[f"{p}.k_proj.weight"]
        bk = sd.get(f"{p}.k_proj.bias")
        heads = (query_metrics(sd[f"{p}.q_proj.weight"].view(n_heads, d, -1), wk, moments[i],
                               h_kv) if query_weighted else [])
        a_rows, b_rows, biases = [], [], []
        for g in range(groups):
            rows = slice(g * m * d, (g + 1) * m * d)
            metric = torch.block_diag(*heads[g * m:(g + 1) * m]) if heads else None
            proj, b = latent_group_factors(wk[rows], moments[i], m * ranks[i], metric)
            a_rows.append(proj @ wk[rows].double())
            b_rows.append(b)
            if bk is not None:
                biases.append(proj @ bk[rows].double())
        state[f"{p}.k_proj.weight"] = torch.cat(a_rows).float()
        state[f"{p}.k_up_proj.weight"] = torch.cat(b_rows).float()
        if bk is not None:
            state[f"{p}.k_proj.bias"] = torch.cat(biases).float()
    return state


def latent_rotary_table(cfg: dict) -> tuple[list[torch.Tensor], float]:
    """(rotary table, attention scaling) of latent keys: the source's full-width inv_freq for
    every layer and KV head (rebuilt keys are rotated exactly as the source's keys)."""
    n_layers, _, h_kv, _, _ = model_dims(cfg)
    inv, scaling = source_inv_freq(cfg)
    return [inv[None].expand(h_kv, -1).double()] * n_layers, scaling


def weight_pca_latent(src, rank: int | Sequence[int], groups: int, *, method: str
                      ) -> tuple[dict, dict[str, torch.Tensor], FactoredKeysConfig]:
    """(config, state dict, factored_keys) of a data-free latent copy of the checkpoint src:
    PCA of W_K's rows (identity input moments). For benchmarks and tests, where the factors'
    values do not matter; ``write_factored`` writes it."""
    cfg, sd = load_checkpoint(src)
    n_layers, _, _, _, hidden = model_dims(cfg)
    state = init_latent_state(cfg, sd, rank, groups, [torch.eye(hidden)] * n_layers, False,
                              query_weighted=False)
    table, scaling = latent_rotary_table(cfg)
    fk = FactoredKeysConfig.build(cfg, rank, table, method=method, source_model=Path(src).name,
                                  rotary_attention_scaling=scaling, key_mode="latent",
                                  latent_groups=groups)
    return cfg, state, fk
