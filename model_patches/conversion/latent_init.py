"""Training-free initialisation of RoPE-exact latent keys: PCA of the pre-RoPE keys.

For one latent group of a layer (the m = H_kv / G consecutive KV heads that share a latent),
with the group's key rows W_K,g ((m·D) × hidden, pre-RoPE) and the calibration second moment
of the attention input C_x = E[x xᵀ]:

    C_k = W_K,g C_x W_K,gᵀ = U Λ Uᵀ          (eigenvalues descending)
    A_g = U_sᵀ W_K,g   (latent projection, s = m·r rows)     B_g = U_s   (key reconstruction)

so k̂ = B_g A_g x = U_s U_sᵀ k is the rank-s projection of the keys with the least expected
squared error E‖k − k̂‖²; at s = m·D it is exact (U orthogonal). Keys are then rotated with the
source's full-width RoPE at their own positions, so the only approximation is k ≈ k̂.
A source key bias b becomes the latent bias U_sᵀ b (k̂ = U_s U_sᵀ (W x + b)).

Checkpoint tensors per layer (docs/checkpoint-format.md, key_mode "latent"): k_proj = A
(groups stacked, [H_kv·r, hidden]), k_up_proj = B (groups stacked by rows, [H_kv·D, m·r]);
q_proj, v_proj unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from engine.checkpoint import FactoredKeysConfig, model_dims
from engine.rotary import source_inv_freq
from engine.weights import load_checkpoint


def latent_group_factors(wk: torch.Tensor, cx: torch.Tensor, dims: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [dims, hidden], B [rows, dims]) for key rows wk [rows, hidden] and input moment cx."""
    wk = wk.double()
    ck = wk @ cx.double() @ wk.T
    _, vecs = torch.linalg.eigh((ck + ck.T) / 2)
    u = vecs.flip(-1)[:, :dims]                       # top `dims` principal directions
    return u.T @ wk, u


def init_latent_state(cfg: dict, sd: dict[str, torch.Tensor], rank: int, groups: int,
                      moments: list[torch.Tensor], progress: bool = True
                      ) -> dict[str, torch.Tensor]:
    """New state dict with latent key projections (k_proj = A, k_up_proj = B) for every layer
    of a Llama-family source: ``rank`` latent dims per KV head, ``groups`` latents per layer."""
    n_layers, _, h_kv, d, _ = model_dims(cfg)
    m = h_kv // groups
    state = dict(sd)
    for i in tqdm(range(n_layers), desc=f"latent init (PCA, r={rank}, groups={groups})",
                  unit="layer", disable=not progress):
        p = f"model.layers.{i}.self_attn"
        wk = sd[f"{p}.k_proj.weight"]
        bk = sd.get(f"{p}.k_proj.bias")
        a_rows, b_rows, biases = [], [], []
        for g in range(groups):
            rows = slice(g * m * d, (g + 1) * m * d)
            a, b = latent_group_factors(wk[rows], moments[i], m * rank)
            a_rows.append(a)
            b_rows.append(b)
            if bk is not None:
                biases.append(b.T @ bk[rows].double())
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


def weight_pca_latent(src, rank: int, groups: int, *, method: str
                      ) -> tuple[dict, dict[str, torch.Tensor], FactoredKeysConfig]:
    """(config, state dict, factored_keys) of a data-free latent copy of the checkpoint src:
    PCA of W_K's rows (identity input moments). For benchmarks and tests, where the factors'
    values do not matter; ``write_factored`` writes it."""
    cfg, sd = load_checkpoint(src)
    n_layers, _, _, _, hidden = model_dims(cfg)
    state = init_latent_state(cfg, sd, rank, groups, [torch.eye(hidden)] * n_layers, False)
    table, scaling = latent_rotary_table(cfg)
    fk = FactoredKeysConfig.build(cfg, rank, table, method=method, source_model=Path(src).name,
                                  rotary_attention_scaling=scaling, key_mode="latent",
                                  latent_groups=groups)
    return cfg, state, fk
