"""QK-only calibration of factored keys: sequential layer-wise attention-output matching.

Thin keys train the thin W_q', W_k'; latent keys train W_q, the latent projection A (k_proj)
and the reconstruction B (k_up_proj).

For layer l, with x_l the STUDENT's own hidden state at that layer (so errors of earlier
layers are seen and compensated), n_l = norm(x_l):

    target_l = W_o · Attn_source(W_q n_l, W_k n_l, W_v n_l)          (original q/k, RoPE)
    min over thin W_q', W_k':  ‖W_o · Attn_thin(W_q' n_l, W_k' n_l, W_v n_l) − target_l‖²

Only the thin query/key projections are trained (values, output projection, norms and MLPs
keep the source's weights); the RoPE table of the thin dims stays the initialisation's.
Then x_{l+1} = the student's full layer applied to x_l. Text: the calibration split of
model_patches.text_sets (disjoint from evaluation), half of it as chat-template
conversations (model_patches.conversion.calibration_data, ``chat_mix``); with ``pos_skip``,
half of the windows at PoSE-style positions (calibration_data.skipped_positions), with
``long_steps`` long windows too (long_range). Progress is saved after each layer next to the
destination (`.<dst>.calib/`), so an interrupted run resumes. Runs on CUDA when available.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from engine.checkpoint import BLOCK, GPT2_ARCH, LLAMA_ARCH, FactoredKeysConfig
from engine.rotary import ThinRotaryEmbedding
from engine.torch_model import TorchCausalLM
from engine.weights import load_checkpoint
from model_patches.conversion.calibration_data import (calibration_windows, skipped_positions,
                                                       window_counts)
from model_patches.conversion.checkpoint_writer import ConversionError
from model_patches.conversion.distill import (E2E_DEFAULTS, e2e_distill, e2e_thin_qk,
                                              e2e_window_set, fingerprint, weights_digest)
from model_patches.conversion.long_range import (LONG_DEFAULTS, RETRIEVAL_DISTANCE,
                                                 check_long_windows, long_range_weights,
                                                 long_window_steps)
from model_patches.text_sets import token_stream

# chat_mix: fraction of calibration windows that are chat-template conversations
# (model_patches.conversion.calibration_data); the rest is Wikipedia prose. An optional
# "varied_mix" setting (not a default) takes that fraction from the varied texts instead.
DEFAULTS = {"tokens": 64 * 256, "seq_len": 256, "steps": 150, "batch": 8, "lr": 2e-3,
            "chat_mix": 0.5}


def window_sets(tok, settings: dict) -> tuple[dict, dict | None]:
    """calibration_windows' arguments for the layer-wise stage and (e2e_steps > 0) the
    end-to-end stage under `settings` (DEFAULTS / E2E_DEFAULTS where absent), both checked
    (calibration_data.window_counts): a ConversionError when a text cannot fill its set, raised
    before either stage spends any time. varied_mix is only in the settings, and so in the
    progress fingerprint, when given, so the shipped recipes' progress files stay valid."""
    opts = {**DEFAULTS, **settings}
    seq = opts["seq_len"]
    layer = {"seq_len": seq, "n": opts["tokens"] // seq, "chat_mix": opts["chat_mix"],
             "varied_mix": opts.get("varied_mix", 0.0)}
    window_counts(tok, **layer)
    e2e = {k: v for k, v in settings.items() if k.startswith("e2e_")}
    return layer, (e2e_window_set(tok, e2e) if {**E2E_DEFAULTS, **e2e}["e2e_steps"] > 0 else None)


def check_calibration(src: str | Path, settings: dict) -> None:
    """Raise ConversionError (one line) unless every calibration stage's window set under
    `settings` can be built from `src`'s tokenizer (:func:`window_sets`) and its position
    limits suit the model (:func:`check_pos_skip`)."""
    tok = AutoTokenizer.from_pretrained(str(src))
    window_sets(tok, settings)
    cfg = json.loads((Path(src) / "config.json").read_text())
    check_pos_skip(cfg, {**DEFAULTS, **E2E_DEFAULTS, **settings})
    check_long_windows(tok, cfg, {**DEFAULTS, **settings})


def check_pos_skip(cfg: dict, opts: dict) -> None:
    """Raise ConversionError (one line) unless each stage's position limit (``pos_skip``,
    ``e2e_pos_skip``; 0 or absent = contiguous positions) lies between its window length and
    the model's positions."""
    longest = cfg.get("max_position_embeddings", cfg.get("n_positions", 0))
    for key, seq in (("pos_skip", "seq_len"), ("e2e_pos_skip", "e2e_seq_len")):
        if opts.get(key) and not opts[seq] <= opts[key] <= longest:
            raise ConversionError(f"calibration {key} {opts[key]} is outside {opts[seq]}.."
                                  f"{longest} (its window length .. the model's positions)")


def calibrate_layer(teacher: TorchCausalLM, student: TorchCausalLM, i: int, x: torch.Tensor,
                    pos: torch.Tensor, names: list[str], opts: dict,
                    freq_lr: float | None = None, long=None) -> tuple[torch.Tensor, dict]:
    """Layer-wise attention-output matching of layer i on the student's own hidden state x:

        n = norm_i(x),   min ‖Attn_student,i(n) − Attn_teacher,i(n)‖² / ‖Attn_teacher,i(n)‖²

    over the student's tensors ``names`` (and, with ``freq_lr``, the layer's rotary
    frequencies, kept non-negative), Adam + cosine schedule, ``opts["steps"]`` steps of
    ``opts["batch"]`` windows; ``pos``: positions [T], or per window [N, T]; the key
    projection (``k_proj``: A for latent keys) at ``opts["key_proj_lr_scale"]`` (default 1)
    times the learning rate. With ``opts["retrieval_weight"]`` = s > 0 each query row's error
    is weighted by :func:`long_range_weights` (distance ``opts["retrieval_distance"]``,
    default RETRIEVAL_DISTANCE) in the training loss. With ``opts["key_fidelity"]`` = λ > 0
    (latent keys) the training loss adds λ ‖B A n − W_k n‖² / ‖W_k n‖²: the reconstructed
    pre-RoPE keys held near the source's (the objective PCA minimises), every token's alike.
    ``long`` = (long windows' student states at layer i, positions): long_range.long_window_steps
    follows. Returns (x after the student's whole layer i, its relative MSE and tail errors)."""
    with torch.no_grad():
        n = student.attn_norm(i, x)
        target = teacher.attention(i, n, pos)
        fidelity = opts.get("key_fidelity", 0)
        keys = teacher.pre_rope_keys(i, n) if fidelity else None
        if keys is not None and keys.shape[-1] != student.h_kv * student.keys[i].dims:
            raise ConversionError("calibration key_fidelity needs full-width (latent) keys")
        strength = opts.get("retrieval_weight", 0)
        weight = (long_range_weights(teacher, i, n, pos, strength,
                                     opts.get("retrieval_distance", RETRIEVAL_DISTANCE))
                  if strength else torch.ones(target.shape[:2], device=x.device))
    # key_proj_lr_scale: the key projection (A for latent keys) at lr x scale, the rest at lr
    scale = opts.get("key_proj_lr_scale", 1.0)
    params = dict(zip(names, student.make_trainable(names)))
    slow = {n for n in params if n.endswith("k_proj.weight")} if scale != 1.0 else set()
    groups = [{"params": [p for n, p in params.items() if n not in slow]}]
    if slow:
        groups.append({"params": [params[n] for n in slow], "lr": opts["lr"] * scale})
    freq = student.keys[i].rope.inv_freq if freq_lr is not None else None
    if freq is not None:
        groups.append({"params": [freq], "lr": freq_lr})
    opt = torch.optim.Adam(groups, lr=opts["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, opts["steps"])
    gen = torch.Generator().manual_seed(i)
    norm = target.pow(2).mean().clamp_min(1e-12)
    weighted_norm = (target.pow(2).mean(-1) * weight).mean().clamp_min(1e-12)
    keys_norm = keys.pow(2).mean().clamp_min(1e-12) if fidelity else None

    def loss_on(idx, weighted=False):
        at = pos[idx] if pos.dim() == 2 else pos
        err = (student.attention(i, n[idx], at) - target[idx]).pow(2).mean(-1)     # [B, T]
        if not weighted:
            return err.mean() / norm
        loss = (err * weight[idx]).mean() / weighted_norm
        if fidelity:                  # + λ · relative error of the reconstructed pre-RoPE keys
            k = student.pre_rope_keys(i, n[idx])
            loss = loss + fidelity * (k - keys[idx]).pow(2).mean() / keys_norm
        return loss

    everything = torch.arange(len(x), device=x.device)
    with torch.no_grad():
        before = loss_on(everything).item()
    for _ in range(opts["steps"]):
        loss = loss_on(torch.randperm(len(x), generator=gen)[: opts["batch"]].to(x.device),
                       weighted=True)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if freq is not None:
            with torch.no_grad():
                freq.clamp_(min=0.0)          # the format wants non-negative frequencies
    record = {"layer": i, "relative_mse_before": before}
    if long is not None:
        record.update(long_window_steps(teacher, student, i, list(params.values()),
                                        lambda idx: loss_on(idx, weighted=True), len(x),
                                        *long, opts, gen))
    with torch.no_grad():
        record["relative_mse_after"] = loss_on(everything).item()
        x = student.mlp_block(i, x + student.attention(i, n, pos))
    return x, record


def _prefix(family: str, i: int) -> str:
    return f"transformer.h.{i}.attn" if family == "gpt2" else f"model.layers.{i}.self_attn"


def _thin_names(family: str, i: int) -> tuple[str, ...]:
    p = _prefix(family, i)
    return (f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.q_proj.bias",
            f"{p}.k_up_proj.weight")          # the last: latent keys' reconstruction B


def calibrate_thin_qk(src: str | Path, cfg: dict, family: str, state: dict[str, torch.Tensor],
                      fk: FactoredKeysConfig, dst: str | Path, progress: bool = True,
                      **settings) -> tuple[dict[str, torch.Tensor], FactoredKeysConfig]:
    """Return (state with calibrated thin q/k weights, the calibrated config: a new one with
    method +calibrated, the JSON-able report as its `calibration` and, with learn_freq, the
    learned rotary frequencies)."""
    e2e = {k: settings.pop(k) for k in list(settings) if k.startswith("e2e_")}
    # learn_freq: also train the thin pairs' rotary frequencies (lr = freq_lr); only part of
    # the fingerprint when on, so the default recipe's progress files stay valid.
    learn = {k: settings.pop(k) for k in ("learn_freq", "freq_lr") if k in settings}
    learn_freq = bool(learn.get("learn_freq")) and family == "llama"
    opts = {**DEFAULTS, **settings}
    src, dst = Path(src), Path(dst)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = AutoTokenizer.from_pretrained(str(src))
    seq = opts["seq_len"]
    layer_set, e2e_set = window_sets(tok, {**settings, **e2e})  # both checked up front
    ids = calibration_windows(tok, **layer_set).to(dev)
    # pos_skip = P > 0: half the windows PoSE-style over positions < P (skipped_positions)
    pos = (skipped_positions(len(ids), seq, opts["pos_skip"]) if opts.get("pos_skip")
           else torch.arange(seq)).to(dev)
    lo = {**LONG_DEFAULTS, **opts}
    long_ids = (calibration_windows(tok, lo["long_seq_len"], lo["long_windows"], opts["chat_mix"],
                                    seed=1).to(dev) if lo["long_steps"] else None)
    teacher = TorchCausalLM(*load_checkpoint(src)).to_device(dev)

    work = dst.parent / f".{dst.name}.calib"
    # the initial factors are part of the fingerprint: progress made from another init
    # (e.g. an older converter) is not resumed
    fp = fingerprint(src, fk.to_block(), {**opts, **(learn if learn_freq else {}), "init":
                                          weights_digest(state, ("k_proj.weight",
                                                                 "k_up_proj.weight"))})
    state = dict(state)
    freqs = [t.clone() for t in fk.inv_freq] if fk.inv_freq is not None else None
    start, x, xl, losses = 0, None, None, []
    if (work / "progress.pt").exists():
        saved = torch.load(work / "progress.pt", map_location=dev)
        if saved.get("fingerprint") == fp:
            start, x, xl, losses = saved["layer"], saved["x"], saved.get("x_long"), saved["losses"]
            state.update(saved["weights"])
            if saved.get("freqs") is not None:
                freqs = saved["freqs"]
    arch = GPT2_ARCH if family == "gpt2" else LLAMA_ARCH
    student = TorchCausalLM({**cfg, BLOCK: fk.to_block(), "architectures": [arch]},
                            state).to_device(dev)
    work.mkdir(parents=True, exist_ok=True)
    lpos = torch.arange(lo["long_seq_len"], device=dev)
    with torch.no_grad():
        x = student.embed(ids, pos) if x is None else x
        xl = student.embed(long_ids, lpos) if long_ids is not None and xl is None else xl

    t0 = time.time()
    bar = tqdm(range(start, student.n_layers), desc=f"calibrating {fk.key_mode} keys", unit="layer",
               disable=not progress, initial=start, total=student.n_layers)
    for i in bar:
        if learn_freq and freqs is not None:
            student.keys[i].rope = ThinRotaryEmbedding(freqs[i], student.h,
                                                       fk.rotary_attention_scaling,
                                                       trainable=True).to(dev)
        names = [n for n in _thin_names(family, i) if n in student.w]
        x, record = calibrate_layer(teacher, student, i, x, pos, names, opts,
                                    learn.get("freq_lr", 1e-4) if learn_freq else None,
                                    None if xl is None else (xl, lpos))
        if xl is not None:
            with torch.no_grad():
                xl = student.layer(i, xl, lpos)
        if learn_freq and freqs is not None:
            freqs[i] = student.keys[i].rope.inv_freq.detach().double().cpu()
        state.update(student.trained_state(names))
        losses.append(record)
        bar.set_postfix(rel_mse=f"{record['relative_mse_before']:.3f}->"
                                f"{record['relative_mse_after']:.3f}")
        weights = {k: state[k] for li in range(i + 1) for k in _thin_names(family, li) if k in state}
        torch.save({"fingerprint": fp, "layer": i + 1, "x": x, "x_long": xl, "losses": losses,
                    "weights": weights, "freqs": freqs if learn_freq else None},
                   work / "progress.pt")
    report = {"recipe": "sequential layer-wise attention-output matching, QK only",
              "tokens": int(ids.numel()), "seq_len": seq, "chat_mix": opts["chat_mix"],
              **({"varied_mix": opts["varied_mix"]} if "varied_mix" in opts else {}),
              **({"pos_skip": opts["pos_skip"]} if opts.get("pos_skip") else {}),
              **({"retrieval_weight": opts["retrieval_weight"], "retrieval_distance":
                  opts.get("retrieval_distance", RETRIEVAL_DISTANCE)}
                 if opts.get("retrieval_weight") else {}),
              **{k: opts[k] for k in ("key_proj_lr_scale", "key_fidelity") if k in opts},
              **({k: lo[k] for k in LONG_DEFAULTS} if lo["long_steps"] else {}),
              "steps_per_layer": opts["steps"],
              "batch": opts["batch"], "lr": opts["lr"], "device": str(dev),
              "seconds": round(time.time() - t0, 1), "layers": losses}
    if learn_freq:
        fk = replace(fk, inv_freq=tuple(freqs))                    # the checkpoint's table
        report["learned_rotary_freq"] = True
    if e2e_set is not None:                                       # e2e_steps > 0
        del teacher, student
        state, report["e2e"] = e2e_thin_qk(src, cfg, state, fk, dst, progress=progress, **e2e)
    return state, replace(fk, method=f"{fk.method}+calibrated", calibration=report)


def recover_merged(src: str | Path, cfg: dict, state: dict[str, torch.Tensor],
                   dst: str | Path, progress: bool = True, **settings
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """Recovery of a KV-head-merged Llama-family model (model_patches.conversion.head_merge): sequential
    layer-wise attention-output matching, as calibrate_thin_qk but every attention weight of
    the merged layer is trained (q/k/v/o and their biases; norms and MLPs are the source's).

    cfg is the merged config (num_key_value_heads = N), state the merged state dict. Layer l
    sees the student's own hidden state x_l; target = the source's attention block on it:

        min ‖W_o' Attn_N(W_q' n_l, W_k' n_l, W_v' n_l) − W_o Attn_src(W_q n_l, W_k n_l, W_v n_l)‖²

    With ``e2e_steps`` > 0, an end-to-end KL pass (e2e_distill) over the q/k/v/o weights of
    every layer follows (the biases stay as the layer-wise stage left them); it saves its
    progress next to `dst` and resumes. Returns (state with the trained attention weights, a
    JSON-able report). The layer-wise stage is not resumable.
    """
    opts = {**DEFAULTS, **settings}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = TorchCausalLM(*load_checkpoint(src)).to_device(dev)
    student = TorchCausalLM(cfg, state).to_device(dev)
    tok = AutoTokenizer.from_pretrained(str(src))
    seq = opts["seq_len"]
    ids = torch.tensor(token_stream(tok, "calibration")[: opts["tokens"]])
    ids = ids[: len(ids) // seq * seq].view(-1, seq).to(dev)
    pos = torch.arange(seq, device=dev)
    state, losses, t0 = dict(state), [], time.time()
    with torch.no_grad():
        x = student.embed(ids, pos)
    bar = tqdm(range(student.n_layers), desc="recovering merged attention", unit="layer",
               disable=not progress)
    for i in bar:
        p = student.prefix(i)
        names = [f"{p}.{m}_proj.{t}" for m in "qkvo" for t in ("weight", "bias")
                 if f"{p}.{m}_proj.{t}" in state]
        x, record = calibrate_layer(teacher, student, i, x, pos, names, opts)
        losses.append(record)
        bar.set_postfix(rel_mse=f"{record['relative_mse_before']:.3f}->"
                                f"{record['relative_mse_after']:.3f}")
    state.update(student.trained_state())
    report = {"recipe": "sequential layer-wise attention-output matching, q/k/v/o",
              "tokens": int(ids.numel()), "seq_len": seq, "steps_per_layer": opts["steps"],
              "batch": opts["batch"], "lr": opts["lr"], "device": str(dev),
              "seconds": round(time.time() - t0, 1), "layers": losses}
    if opts.get("e2e_steps", 0) > 0:
        del teacher, student, x
        trained, report["e2e"] = e2e_distill(
            src, cfg, state, ("q_proj", "k_proj", "v_proj", "o_proj"), dst,
            {"kv_head_merge": cfg.get("kv_head_merge"), "layerwise": report["layers"]},
            "end-to-end merged attention", progress, **settings)
        state = {**state, **trained}
    return state, report
