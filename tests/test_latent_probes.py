"""loadtests.latent_probes: the exact rank allocation and the key-mean energy shares."""

from __future__ import annotations

import itertools

import torch

from loadtests.latent_probes import allocate_ranks, key_mean_shares


def test_allocation_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    spectra = [torch.rand(12, generator=g).sort(descending=True).values * s for s in (1, 5, 0.2)]
    allowed, budget = [1, 2, 3, 4], 7

    def cost(rs):
        return sum(s[2 * r:].sum().item() for s, r in zip(spectra, rs))
    feasible = [rs for rs in itertools.product(allowed, repeat=3) if sum(rs) <= budget]
    got = allocate_ranks(spectra, budget, allowed, kv_heads=2)
    assert sum(got) <= budget and all(r in allowed for r in got)
    assert abs(cost(got) - min(map(cost, feasible))) < 1e-9
    assert got[1] >= got[0] >= got[2]                   # the largest spectrum gets the most dims


def test_key_mean_shares():
    """Keys with covariance diag(4, 2, 1, 1) and mean 1.5 along the last axis: a 1-dim latent
    keeps the variance-4 axis either way, so it misses 2 + 1 + 1 + 1.5² uncentred and
    2 + 1 + 1 with the mean restored (of 4 + 2 + 1 + 1 + 1.5² in all); full width misses
    nothing."""
    hidden, mean = 4, torch.tensor([0.0, 0.0, 0.0, 1.5], dtype=torch.float64)
    cx1 = torch.zeros(hidden + 1, hidden + 1, dtype=torch.float64)
    cx1[:hidden, :hidden] = torch.diag(torch.tensor([4.0, 2, 1, 1], dtype=torch.float64)) \
        + torch.outer(mean, mean)                                       # E[x xᵀ]
    cx1[:hidden, -1] = cx1[-1, :hidden] = mean
    cx1[-1, -1] = 1.0
    wk = torch.eye(hidden)
    unc, cen = key_mean_shares(wk, cx1, 1)
    total = 8 + 2.25
    assert abs(unc - 6.25 / total) < 1e-9 and abs(cen - 4 / total) < 1e-9
    assert key_mean_shares(wk, cx1, hidden) == (0.0, 0.0)


def test_score_spectrum_tail_is_the_query_weighted_init_error(tmp_path):
    """layer_spectra's ``score`` spectrum and init_latent_state's query-weighted latent share
    one construction: the eigenvalues beyond the latent's H_kv·r dims are exactly the init's
    score error tr(M (W_K − B A) C_x (W_K − B A)ᵀ), M = blockdiag over KV heads of C_q,h;
    ``keyfrac`` is a distribution."""
    from engine.checkpoint import model_dims
    from loadtests.latent_probes import layer_spectra
    from model_patches.conversion.checkpoint_writer import read_source
    from model_patches.conversion.latent_init import init_latent_state, query_metrics
    from tests.engine_utils import tiny_llama

    cfg, sd, _ = read_source(tiny_llama(tmp_path / "src", heads=4, kv_heads=2, hidden=64))
    n_layers, h, h_kv, d, hidden = model_dims(cfg)
    g = torch.Generator().manual_seed(1)
    moments = []
    for _ in range(n_layers):
        x = torch.randn(hidden, 4 * hidden, generator=g, dtype=torch.float64)
        moments.append(x @ x.T / x.shape[1])
    spectra = layer_spectra(cfg, sd, moments)
    r = 4
    state = init_latent_state(cfg, sd, r, 1, moments, progress=False, query_weighted=True)
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn"
        wk = sd[f"{p}.k_proj.weight"].double()
        err_w = wk - state[f"{p}.k_up_proj.weight"].double() @ state[f"{p}.k_proj.weight"].double()
        metric = torch.block_diag(*query_metrics(sd[f"{p}.q_proj.weight"].view(h, d, -1), wk,
                                                 moments[i], h_kv))
        err = torch.trace(metric @ err_w @ moments[i] @ err_w.T).item()
        tail = spectra["score"][i][h_kv * r:].sum().item()
        assert abs(err - tail) <= 1e-3 * spectra["score"][i].sum().item(), (i, err, tail)
        assert abs(spectra["keyfrac"][i].sum().item() - 1) < 1e-9
        assert torch.all(spectra["score"][i][:-1] >= spectra["score"][i][1:])
