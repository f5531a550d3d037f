"""KV head merging (MHA → GQA): fewer KV heads by calibrated low-rank merging.

    merge_kv_heads(src, dst, kv_heads=1)                    # keys: per-frequency complex PCA
    merge_kv_heads(src, dst, kv_heads=1, merge_keys="real") # keys: per-dimension real PCA

The output is a STANDARD checkpoint of the source architecture (e.g. LlamaForCausalLM) with
``num_key_value_heads = N``: stock vLLM and transformers serve it, no plugin needed.

Groups. New KV head n serves the query heads Q_n = [n·H/N, (n+1)·H/N) (HF/vLLM GQA layout);
it replaces S_n, the source KV heads those query heads read (G = |S_n|; when N divides H_kv,
S_n are disjoint runs of H_kv/N heads). Every merge below is done per new head n.

Statistics. Keys and values are linear in the attention input x (k = W_k x + b_k), so the
second moments of the calibration activations are exact from C_x = E[x xᵀ] (the converter's
statistics, model_patches.conversion.activation_stats.input_moments):
E[k_a k_bᵀ] = W_k^a C_x W_k^bᵀ. A bias is handled by appending a constant 1 to x. This is
the PCA of the collected K/V caches (calibration split of model_patches.text_sets),
without storing them.

Keys, "complex" (commutes with RoPE). HF Llama rotates dims i and i + D/2 together
(rotate_half), i.e. z_i = k_i + j·k_{i+D/2} is multiplied by e^{j·pos·θ_i}. Per frequency
i, stack the group's G complex keys κ_i = (z_{a,i})_{a∈S_n} and take the rank-1 complex PCA
κ_i ≈ u_i c_i with c_i = a_iᴴ κ_i: the merged head caches c_i (one complex number = the
same 2 dims), and query head q (source head a) becomes z'_{q,i} = conj(u_{a,i}) z_{q,i}, since

    Re(conj(z_q e^{jθt}) z_{a} e^{jθs}) ≈ Re(conj(conj(u_a) z_q e^{jθt}) c e^{jθs}).

A complex scalar commutes with the rotation, so the folding into W_k and W_q is exact
whenever the group's keys are rank 1 at every frequency (e.g. heads equal up to a complex
scalar per frequency). Objective (query-weighted): min Σ_a w_{a,i} E|z_{a,i} − u_a c|² with
w_{a,i} = Σ_{q→a} E|z_{q,i}|², the expected squared score error for independent q and k.
With Ω = diag(w): ũ = top eigenvector of Ω^½ E[κκᴴ] Ω^½, encoder a = Ω^½ ũ, decoder
u = Ω^-½ ũ (``weighting="none"``: Ω = I, the plain PCA of the keys).

Keys, "real" (does not commute with RoPE): the same rank-1 PCA per head DIMENSION with real
coefficients (k'_j = Σ_a a_{a,j} k_{a,j}, q'_{q,j} = u_{a,j} q_{q,j}; the query weights are
averaged over each rotary pair); RoPE is then applied to the merged dims as usual. Exact
without RoPE; under RoPE only where a pair's two coefficients agree (a real scalar per pair
is a special complex one), e.g. heads equal up to a real scalar per pair.

Values (no RoPE, real PCA across the group): stack v_S = (v_a)_{a∈S_n} ∈ R^{G·D} and keep D
principal directions: v' = E v_S (cached), v_a ≈ M_a v'. Attention is linear in v, so the
output of query head q (source head a) is o_q = W_o^q Σ_s p_s v_a(s) ≈ (W_o^q M_a) Σ_s p_s v'(s):
W_v' = E W_v^S, W_o'^q = W_o^q M_a; exact when the stacked values span ≤ D dims. Weighted by
the output projection: Ω_a = Σ_{q→a} W_o^qᵀ W_o^q (block diagonal R = Ω^½), Ũ = top-D
eigenvectors of R E[v_S v_Sᵀ] R, E = Ũᵀ R, M = R⁻¹ Ũ.

The merged model caches N/H_kv of the source's KV bytes per token. Optional recovery
(``recover=...``, `--recover`): model_patches.conversion.calibrate.recover_merged trains the merged
attention layer by layer against the source's attention outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from engine.checkpoint import model_dims
from engine.kv_layout import kv_layout
from model_patches.conversion.activation_stats import DEFAULT_STAT_TOKENS, input_moments
from model_patches.conversion.calibrate import recover_merged
from model_patches.conversion.distill import cleanup
from model_patches.conversion.checkpoint_writer import ConversionError, read_source, write_checkpoint

MERGE_KEYS = ("complex", "real")
WEIGHTINGS = ("attention", "none")
_EPS = 1e-9


@dataclass
class MergeSummary:
    dst: Path
    kv_heads: tuple[int, int]          # (source, merged)
    merge_keys: str                    # "complex" or "real" (+ " + recovery")
    kv_bytes_per_token: int            # fp16, all layers
    baseline_kv_bytes_per_token: int

    def lines(self) -> list[str]:
        b, n = self.baseline_kv_bytes_per_token, self.kv_bytes_per_token
        return [f"wrote {self.dst}",
                f"KV heads {self.kv_heads[0]} -> {self.kv_heads[1]} (keys: {self.merge_keys}; "
                f"a standard GQA checkpoint, no plugin needed)",
                f"KV cache bytes per token (fp16): {b:,} -> {n:,} ({1 - n / b:.1%} smaller, "
                f"{b / n:.2f}x tokens per byte)"]


def check_kv_heads(cfg: dict, family: str, kv_heads: int, merge_keys: str = "complex") -> None:
    """Raise ConversionError (one line) unless --kv-heads N can merge this source."""
    _, h, h_kv, _, _ = model_dims(cfg)
    if family != "llama":
        raise ConversionError("--kv-heads needs a Llama-family source (GPT-2 has no "
                              "num_key_value_heads, so a merged GPT-2 is not a standard checkpoint)")
    if merge_keys not in MERGE_KEYS:
        raise ConversionError(f"--merge-keys {merge_keys!r} is not one of {', '.join(MERGE_KEYS)}")
    if kv_heads < 1:
        raise ConversionError(f"--kv-heads {kv_heads} must be at least 1")
    if kv_heads >= h_kv:
        raise ConversionError(f"--kv-heads {kv_heads} must be less than the source's "
                              f"{h_kv} KV heads")
    if h % kv_heads:
        raise ConversionError(f"--kv-heads {kv_heads} does not divide the {h} query heads")


def groups(h: int, h_kv: int, n: int) -> list[list[int]]:
    """S_n: the source KV heads read by the query heads of each new KV head."""
    g_src, g_new = h // h_kv, h // n
    return [sorted({q // g_src for q in range(m * g_new, (m + 1) * g_new)}) for m in range(n)]


def _top_eig(m: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k eigenvectors (columns) of Hermitian matrices m [..., n, n]. Real ones get a
    fixed sign (largest entry positive), so equal problems give equal answers."""
    _, vecs = torch.linalg.eigh(m)
    vecs = vecs[..., -k:].flip(-1)
    if not vecs.is_complex():
        peak = vecs.gather(-2, vecs.abs().argmax(-2, keepdim=True))
        vecs = vecs * peak.sign()
    return vecs


def _sqrt_psd(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(m^½, m^-½) of a symmetric PSD matrix, regularised."""
    vals, vecs = torch.linalg.eigh(m)
    vals = vals.clamp_min(_EPS * vals.max().clamp_min(_EPS))
    return (vecs * vals.sqrt()) @ vecs.T, (vecs / vals.sqrt()) @ vecs.T


def _complex(w: torch.Tensor) -> torch.Tensor:
    """[..., D, in] real rows -> [..., D/2, in] complex rows z_i = row_i + j·row_{i+D/2}."""
    half = w.shape[-2] // 2
    return torch.complex(w[..., :half, :], w[..., half:, :])


def _real(z: torch.Tensor) -> torch.Tensor:
    return torch.cat((z.real, z.imag), dim=-2)


def merge_keys_complex(wk: torch.Tensor, wq: torch.Tensor, src_of_q: list[int],
                       cx: torch.Tensor, weighting: str = "attention"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frequency rank-1 complex PCA of the group's pre-RoPE keys.

    wk [G, D, in] (the group's key rows), wq [Q, D, in] (its query heads; src_of_q[q] is the
    index in the group of the key head query q read), cx [in, in]. Returns the merged key
    rows [D, in] and the new query rows [Q, D, in]."""
    kc, qc = _complex(wk), _complex(wq)                      # [G, D/2, in], [Q, D/2, in]
    kcx = kc @ cx.to(kc.dtype)
    cov = torch.einsum("aim,bim->iab", kcx, kc.conj())        # E[z_a conj(z_b)]  [D/2, G, G]
    w = _query_energy(qc, cx, src_of_q, wk.shape[0], weighting)   # [D/2, G]
    s = w.sqrt()
    ut = _top_eig(s[:, :, None] * cov * s[:, None, :], 1)[..., 0]    # [D/2, G]
    enc, dec = s * ut, ut / s
    k_new = torch.einsum("ia,aim->im", enc.conj(), kc)        # c_i = a_iᴴ κ_i
    q_new = dec.conj().T[src_of_q][:, :, None] * qc           # z'_q = conj(u_a) z_q
    return _real(k_new), _real(q_new)


def merge_keys_real(wk: torch.Tensor, wq: torch.Tensor, src_of_q: list[int],
                    cx: torch.Tensor, weighting: str = "attention"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension rank-1 real PCA of the group's pre-RoPE keys (not RoPE-commuting).
    Same arguments and returns as merge_keys_complex."""
    cov = torch.einsum("ajm,bjm->jab", wk @ cx, wk)           # [D, G, G]
    w = _query_energy(wq, cx, src_of_q, wk.shape[0], weighting)   # [D, G]
    half = w.shape[0] // 2                 # one weight per rotary pair: real scalars per pair
    w = ((w[:half] + w[half:]) / 2).repeat(2, 1)                  # (the commuting case) stay exact
    s = w.sqrt()
    ut = _top_eig(s[:, :, None] * cov * s[:, None, :], 1)[..., 0]    # [D, G]
    enc, dec = s * ut, ut / s
    k_new = torch.einsum("ja,ajm->jm", enc, wk)
    q_new = dec.T[src_of_q][:, :, None] * wq
    return k_new, q_new


def _query_energy(q: torch.Tensor, cx: torch.Tensor, src_of_q: list[int], g: int,
                  weighting: str) -> torch.Tensor:
    """w[i, a] = Σ_{q reads a} E|q_i|² (per frequency or dim i), floored; ones if unweighted."""
    if weighting == "none":
        return torch.ones(q.shape[1], g, dtype=torch.float64)
    e = torch.einsum("qim,qim->qi", q @ cx.to(q.dtype), q.conj()).real   # [Q, I]
    w = torch.zeros(q.shape[1], g, dtype=torch.float64)
    w.index_add_(1, torch.tensor(src_of_q), e.T.double())
    return w.clamp_min(_EPS * w.max().clamp_min(_EPS))


def merge_values(wv: torch.Tensor, wo: torch.Tensor, src_of_q: list[int], cx: torch.Tensor,
                 weighting: str = "attention") -> tuple[torch.Tensor, torch.Tensor]:
    """Real PCA of the group's stacked values, G·D -> D.

    wv [G, D, in], wo [hidden, Q, D] (the o_proj columns of the group's query heads).
    Returns the merged value rows [D, in] and the new o_proj columns [hidden, Q, D]."""
    g, d, _ = wv.shape
    ws = wv.reshape(g * d, -1)
    cov = ws @ cx @ ws.T                                       # [G·D, G·D]
    r = torch.eye(g * d, dtype=torch.float64)
    r_inv = r.clone()
    if weighting != "none":
        for a in range(g):
            cols = [q for q, s in enumerate(src_of_q) if s == a]
            om = torch.einsum("hqd,hqe->de", wo[:, cols], wo[:, cols])
            blk = slice(a * d, (a + 1) * d)
            r[blk, blk], r_inv[blk, blk] = _sqrt_psd(om)
    ut = _top_eig(r @ cov @ r.T, d)                            # [G·D, D]
    enc, dec = ut.T @ r, r_inv @ ut                            # v' = enc v_S, v_S ≈ dec v'
    v_new = enc @ ws
    dec = dec.view(g, d, d)
    o_new = torch.einsum("hqd,qde->hqe", wo, dec[src_of_q])
    return v_new, o_new


def merge_layer(sd: dict[str, torch.Tensor], i: int, cfg: dict, n: int, cx: torch.Tensor,
                merge_keys: str = "complex", weighting: str = "attention"
                ) -> dict[str, torch.Tensor]:
    """The merged attention tensors of layer i (float32), from the source state dict."""
    _, h, h_kv, d, hidden = model_dims(cfg)
    p = f"model.layers.{i}.self_attn"
    aug = any(f"{p}.{x}_proj.bias" in sd for x in "qkv")

    def rows(name: str, heads: int) -> torch.Tensor:          # [heads, D, in(+1)] float64
        w = sd[f"{p}.{name}.weight"].double()
        if aug:
            b = sd.get(f"{p}.{name}.bias")
            b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.double()
            w = torch.cat((w, b[:, None]), 1)
        return w.view(heads, d, -1)

    wq, wk, wv = rows("q_proj", h), rows("k_proj", h_kv), rows("v_proj", h_kv)
    wo = sd[f"{p}.o_proj.weight"].double().view(hidden, h, d)
    key_fn = merge_keys_complex if merge_keys == "complex" else merge_keys_real
    g_src, g_new = h // h_kv, h // n
    qs, ks, vs, os_ = [], [], [], []
    for m, s_n in enumerate(groups(h, h_kv, n)):
        qrange = list(range(m * g_new, (m + 1) * g_new))
        src_of_q = [s_n.index(q // g_src) for q in qrange]
        k_new, q_new = key_fn(wk[s_n], wq[qrange], src_of_q, cx, weighting)
        v_new, o_new = merge_values(wv[s_n], wo[:, qrange], src_of_q, cx, weighting)
        qs.append(q_new), ks.append(k_new), vs.append(v_new), os_.append(o_new)
    out = {}
    for name, parts in (("q_proj", qs), ("k_proj", ks), ("v_proj", vs)):
        w = torch.cat([t.reshape(-1, t.shape[-1]) for t in parts])
        if aug:
            w, b = w[:, :-1], w[:, -1]
            if f"{p}.{name}.bias" in sd:
                out[f"{p}.{name}.bias"] = b.float().contiguous()
        out[f"{p}.{name}.weight"] = w.float().contiguous()
    out[f"{p}.o_proj.weight"] = torch.cat(os_, 1).reshape(hidden, h * d).float().contiguous()
    return out


def merge_state(cfg: dict, sd: dict[str, torch.Tensor], n: int, moments: list[torch.Tensor],
                merge_keys: str = "complex", weighting: str = "attention",
                progress: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(merged config, merged state dict). moments[l]: C_x of layer l's attention input,
    [in, in], or [in+1, in+1] for [x; 1] when the attention has biases."""
    n_layers, _, h_kv, _, hidden = model_dims(cfg)
    state = dict(sd)
    for i in tqdm(range(n_layers), desc=f"merging KV heads {h_kv}->{n} ({merge_keys} keys)",
                  unit="layer", disable=not progress):
        state.update(merge_layer(sd, i, cfg, n, moments[i].double(), merge_keys, weighting))
    new_cfg = {**cfg, "num_key_value_heads": n}
    return new_cfg, state


def _has_attention_bias(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) for k in sd)


def _fp16_kv_bytes(cfg: dict) -> int:
    return kv_layout(cfg, "fp16").bytes_per_token


def check_gqa_dir(path: Path) -> None:
    """Shapes of a written GQA checkpoint's attention tensors against its config.json."""
    cfg = json.loads((path / "config.json").read_text())
    with safe_open(str(path / "model.safetensors"), framework="pt") as st:
        shapes = {k: tuple(st.get_slice(k).get_shape()) for k in st.keys()}
    n_layers, h, h_kv, d, hidden = model_dims(cfg)
    for i in range(n_layers):
        p = f"model.layers.{i}.self_attn"
        for name, shape in (("q_proj", (h * d, hidden)), ("k_proj", (h_kv * d, hidden)),
                            ("v_proj", (h_kv * d, hidden)), ("o_proj", (hidden, h * d))):
            got = shapes.get(f"{p}.{name}.weight")
            if got != shape:
                raise ConversionError(f"internal error: {p}.{name}.weight has shape {got}, "
                                      f"expected {shape}")


def merge_kv_heads(src: str | Path, dst: str | Path, kv_heads: int, *,
                   merge_keys: str = "complex", weighting: str = "attention",
                   stat_tokens: int | None = None, recover: dict | None = None,
                   force: bool = False, progress: bool = True) -> MergeSummary:
    """Write `src` with its KV heads merged into `kv_heads` heads at `dst` (see module doc).
    recover: settings of model_patches.conversion.calibrate.recover_merged ({} = its defaults), which
    then trains the merged attention against `src`; None: training-free."""
    src, dst = Path(src), Path(dst)
    if weighting not in WEIGHTINGS:
        raise ConversionError(f"weighting {weighting!r} is not one of {', '.join(WEIGHTINGS)}")
    if dst.exists() and not force:
        raise ConversionError(f"{dst} already exists (pass --force to replace it)")
    cfg, sd, family = read_source(src)
    check_kv_heads(cfg, family, kv_heads, merge_keys)
    moments = input_moments(src, stat_tokens or DEFAULT_STAT_TOKENS, progress=progress,
                            augment=_has_attention_bias(sd))
    new_cfg, state = merge_state(cfg, sd, kv_heads, moments, merge_keys, weighting, progress)
    new_cfg["kv_head_merge"] = {"source_kv_heads": model_dims(cfg)[2], "kv_heads": kv_heads,
                                "merge_keys": merge_keys, "weighting": weighting,
                                "stat_tokens": stat_tokens or DEFAULT_STAT_TOKENS,
                                "source_model": cfg.get("_name_or_path") or src.name}
    if recover is not None:
        state, report = recover_merged(src, new_cfg, state, dst, progress=progress, **recover)
        new_cfg["kv_head_merge"]["recovery"] = report
    write_checkpoint(src, dst, new_cfg, state, force=force, validate=check_gqa_dir)
    if recover is not None:
        cleanup(dst)                      # the end-to-end pass's saved progress
    return MergeSummary(dst, (model_dims(cfg)[2], kv_heads),
                        merge_keys + (" + recovery" if recover is not None else ""),
                        _fp16_kv_bytes(new_cfg), _fp16_kv_bytes(cfg))
