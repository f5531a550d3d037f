"""QK-only calibration of thin projections: sequential layer-wise attention-output matching.

For layer l, with x_l the STUDENT's own hidden state at that layer (so errors of earlier
layers are seen and compensated), n_l = norm(x_l):

    target_l = W_o · Attn_source(W_q n_l, W_k n_l, W_v n_l)          (original q/k, RoPE)
    min over thin W_q', W_k':  ‖W_o · Attn_thin(W_q' n_l, W_k' n_l, W_v n_l) − target_l‖²

Only the thin query/key projections are trained (values, output projection, norms and MLPs
keep the source's weights); the RoPE table of the thin dims stays the initialisation's.
Then x_{l+1} = the student's full layer applied to x_l. Text: the calibration split of
model_patches.evaluation.text_sets (disjoint from evaluation), half of it as chat-template
conversations (model_patches.conversion.calibration_data, ``chat_mix``). After each layer the progress is saved
next to the destination (`.<dst>.calib/`), so an interrupted run resumes where it stopped.
Runs on CUDA when available.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.checkpoint import model_dims
from engine.rotary import ThinRotaryEmbedding

# chat_mix: fraction of calibration windows that are chat-template conversations
# (model_patches.conversion.calibration_data); the rest is Wikipedia prose.
DEFAULTS = {"tokens": 64 * 256, "seq_len": 256, "steps": 150, "batch": 8, "lr": 2e-3,
            "chat_mix": 0.5}
# Optional end-to-end pass after the layer-wise one (e2e_steps = 0: off).
E2E_DEFAULTS = {"e2e_steps": 0, "e2e_seq_len": 256, "e2e_batch": 4, "e2e_lr": 1e-4,
                "e2e_save_every": 10, "e2e_chat_mix": 0.5}


def _attn(q, k, v, n_heads, n_kv, r, d, scale, rope, pos):
    """q [B, T, H*r], k [B, T, H_kv*r], v [B, T, H_kv*D] -> [B, T, H*D] (causal, GQA)."""
    b, t, _ = q.shape
    if rope is not None:
        qf, kf = rope(pos.repeat(b), q.reshape(b * t, -1), k.reshape(b * t, -1))
        q, k = qf.view(b, t, -1), kf.view(b, t, -1)
    q = q.view(b, t, n_heads, r).transpose(1, 2)
    k = k.view(b, t, n_kv, r).transpose(1, 2)
    v = v.view(b, t, n_kv, d).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                       enable_gqa=n_heads != n_kv)
    return o.transpose(1, 2).reshape(b, t, n_heads * d)


class _LearnedRope:
    """Thin RoPE with a trainable frequency table [H_kv, r/2] (same convention as
    engine.rotary.ThinRotaryEmbedding: thin dims j and j + r/2 form a pair)."""

    def __init__(self, freq: torch.Tensor, n_heads: int, scaling: float):
        self.freq, self.scaling = freq, scaling
        self.h_kv, self.group = freq.shape[0], n_heads // freq.shape[0]

    def __call__(self, positions, q, k):
        from engine.rotary import rotate_half
        n = positions.shape[0]
        ang = positions.to(self.freq.dtype)[:, None, None] * self.freq[None]
        ang = torch.cat((ang, ang), -1)
        cos, sin = ang.cos() * self.scaling, ang.sin() * self.scaling
        k3 = k.view(n, self.h_kv, -1)
        k3 = k3 * cos + rotate_half(k3) * sin
        q4 = q.view(n, self.h_kv, self.group, -1)
        q4 = q4 * cos[:, :, None] + rotate_half(q4) * sin[:, :, None]
        return q4.reshape(q.shape), k3.reshape(k.shape)


class _Layer:
    """Uniform access to one source decoder layer (Llama or GPT-2 family)."""

    def __init__(self, model, family: str, i: int, hidden: int):
        self.family = family
        if family == "llama":
            L = model.model.layers[i]
            self.norm1, self.norm2, self.mlp = L.input_layernorm, L.post_attention_layernorm, L.mlp
            a = L.self_attn
            self.wq, self.wk, self.wv = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
            self.bv = a.v_proj.bias
            self.out = a.o_proj
        else:
            L = model.transformer.h[i]
            self.norm1, self.norm2, self.mlp = L.ln_1, L.ln_2, L.mlp
            w, bias = L.attn.c_attn.weight.T, L.attn.c_attn.bias
            self.wq, self.wk, self.wv = w[:hidden], w[hidden:2 * hidden], w[2 * hidden:]
            self.bq, self.bk, self.bv = bias[:hidden], bias[hidden:2 * hidden], bias[2 * hidden:]
            self.out = L.attn.c_proj

    def mlp_block(self, x):
        return x + self.mlp(self.norm2(x))


def _prefix(family: str, i: int) -> str:
    return f"transformer.h.{i}.attn" if family == "gpt2" else f"model.layers.{i}.self_attn"


def _thin_names(family: str, i: int) -> tuple[str, ...]:
    p = _prefix(family, i)
    return (f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.q_proj.bias")


def _fingerprint(src: Path, block: dict, settings: dict) -> str:
    h = hashlib.sha256(json.dumps([str(src.resolve()), block, settings], sort_keys=True,
                                  default=str).encode())
    return h.hexdigest()[:16]


def calibrate_thin_qk(src: str | Path, cfg: dict, family: str, state: dict[str, torch.Tensor],
                      block: dict, dst: str | Path, progress: bool = True,
                      **settings) -> tuple[dict[str, torch.Tensor], dict]:
    """Return (state with calibrated thin q/k weights, a JSON-able report)."""
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.checkpoint import FactoredKeysConfig
    from model_patches.conversion.calibration_data import calibration_windows
    from model_patches.conversion.checkpoint_writer import source_inv_freq

    e2e = {k: settings.pop(k) for k in list(settings) if k.startswith("e2e_")}
    # learn_freq: also train the thin pairs' rotary frequencies (lr = freq_lr); only part of
    # the fingerprint when on, so the default recipe's progress files stay valid.
    learn = {k: settings.pop(k) for k in ("learn_freq", "freq_lr") if k in settings}
    learn_freq = bool(learn.get("learn_freq")) and family == "llama"
    opts = {**DEFAULTS, **settings}
    src, dst = Path(src), Path(dst)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_layers, h, h_kv, d, hidden = model_dims(cfg)
    fk = FactoredKeysConfig.from_hf_config({**cfg, "factored_keys": block})
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    tok = AutoTokenizer.from_pretrained(str(src))
    seq = opts["seq_len"]
    ids = calibration_windows(tok, seq, opts["tokens"] // seq, opts["chat_mix"]).to(dev)
    pos = torch.arange(seq, device=dev)
    src_rope = None
    if family == "llama":
        inv, scaling = source_inv_freq(cfg)
        src_rope = ThinRotaryEmbedding(inv[None].expand(h_kv, -1).double(), h, scaling).to(dev)
    scale = fk.softmax_scale

    work = dst.parent / f".{dst.name}.calib"
    fp = _fingerprint(src, block, {**opts, **learn} if learn_freq else opts)
    state = dict(state)
    freqs = [t.clone() for t in fk.inv_freq] if fk.inv_freq is not None else None
    start, x, losses = 0, None, []
    if (work / "progress.pt").exists():
        saved = torch.load(work / "progress.pt", map_location=dev)
        if saved.get("fingerprint") == fp:
            start, x, losses = saved["layer"], saved["x"], saved["losses"]
            state.update({k: v for k, v in saved["weights"].items()})
            if saved.get("freqs") is not None:
                freqs = saved["freqs"]
    work.mkdir(parents=True, exist_ok=True)
    if x is None:
        with torch.no_grad():
            if family == "llama":
                x = model.model.embed_tokens(ids)
            else:
                x = model.transformer.wte(ids) + model.transformer.wpe(pos)[None]

    t0 = time.time()
    bar = tqdm(range(start, n_layers), desc="calibrating thin q/k", unit="layer",
               disable=not progress, initial=start, total=n_layers)
    for i in bar:
        L = _Layer(model, family, i, hidden)
        r = fk.ranks[i]
        p = _prefix(family, i)
        rope, freq = None, None
        if fk.inv_freq is not None and learn_freq:
            freq = freqs[i].clone().float().to(dev).requires_grad_(True)
            rope = _LearnedRope(freq, h, fk.rotary_attention_scaling)
        elif fk.inv_freq is not None:
            rope = ThinRotaryEmbedding(fk.inv_freq[i], h, fk.rotary_attention_scaling).to(dev)
        with torch.no_grad():
            n = L.norm1(x)
            v = F.linear(n, L.wv, L.bv)
            tq = F.linear(n, L.wq, getattr(L, "bq", None))
            tk = F.linear(n, L.wk, getattr(L, "bk", None))
            target = L.out(_attn(tq, tk, v, h, h_kv, d, d, scale, src_rope, pos))
        wq = state[f"{p}.q_proj.weight"].clone().to(dev).requires_grad_(True)
        wk = state[f"{p}.k_proj.weight"].clone().to(dev).requires_grad_(True)
        bq = state.get(f"{p}.q_proj.bias")
        bq = None if bq is None else bq.clone().to(dev).requires_grad_(True)
        params = [t for t in (wq, wk, bq) if t is not None]
        groups = [{"params": params}]
        if freq is not None:
            groups.append({"params": [freq], "lr": learn.get("freq_lr", 1e-4)})
        opt = torch.optim.Adam(groups, lr=opts["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, opts["steps"])
        gen = torch.Generator().manual_seed(i)
        norm = target.pow(2).mean().clamp_min(1e-12)

        def loss_on(idx):
            out = L.out(_attn(F.linear(n[idx], wq, bq), F.linear(n[idx], wk), v[idx], h, h_kv,
                              r, d, scale, rope, pos))
            return (out - target[idx]).pow(2).mean() / norm

        with torch.no_grad():
            before = loss_on(torch.arange(len(ids), device=dev)).item()
        for _ in range(opts["steps"]):
            idx = torch.randperm(len(ids), generator=gen)[: opts["batch"]].to(dev)
            loss = loss_on(idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if freq is not None:
                with torch.no_grad():
                    freq.clamp_(min=0.0)          # the format wants non-negative frequencies
        with torch.no_grad():
            after = loss_on(torch.arange(len(ids), device=dev)).item()
            state[f"{p}.q_proj.weight"] = wq.detach().cpu()
            state[f"{p}.k_proj.weight"] = wk.detach().cpu()
            if bq is not None:
                state[f"{p}.q_proj.bias"] = bq.detach().cpu()
            if freq is not None:
                freqs[i] = freq.detach().double().cpu()
            attn = L.out(_attn(F.linear(n, wq, bq), F.linear(n, wk), v, h, h_kv, r, d, scale,
                               rope, pos))
            x = L.mlp_block(x + attn)
        losses.append({"layer": i, "relative_mse_before": before, "relative_mse_after": after})
        bar.set_postfix(rel_mse=f"{before:.3f}->{after:.3f}")
        weights = {k: state[k] for li in range(i + 1) for k in _thin_names(family, li) if k in state}
        torch.save({"fingerprint": fp, "layer": i + 1, "x": x, "losses": losses,
                    "weights": weights, "freqs": freqs if learn_freq else None},
                   work / "progress.pt")
    report = {"recipe": "sequential layer-wise attention-output matching, QK only",
              "tokens": int(ids.numel()), "seq_len": seq, "chat_mix": opts["chat_mix"],
              "steps_per_layer": opts["steps"],
              "batch": opts["batch"], "lr": opts["lr"], "device": str(dev),
              "seconds": round(time.time() - t0, 1), "layers": losses}
    if learn_freq:
        block["rotary_inv_freq"] = [f.tolist() for f in freqs]    # the checkpoint's table
        report["learned_rotary_freq"] = True
    if {**E2E_DEFAULTS, **e2e}["e2e_steps"] > 0:
        del model
        state, report["e2e"] = e2e_thin_qk(src, cfg, state, block, dst, progress=progress, **e2e)
    return state, report


def e2e_thin_qk(src: str | Path, cfg: dict, state: dict[str, torch.Tensor], block: dict,
                dst: str | Path, progress: bool = True, **settings
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """End-to-end QK-only distillation (Llama family) of a factored student: e2e_distill with
    only the thin q/k weights trained."""
    student_cfg = {**cfg, "factored_keys": block, "architectures": ["FactoredLlamaForCausalLM"]}
    fp_block = {k: v for k, v in block.items() if k != "calibration"}
    trained, report = e2e_distill(src, student_cfg, state, ("q_proj", "k_proj"),
                                  dst, fp_block, "end-to-end thin q/k", progress, **settings)
    report["recipe"] = "end-to-end KL(teacher || student), QK only"
    return {**state, **trained}, report


def e2e_distill(src: str | Path, student_cfg: dict, overrides: dict[str, torch.Tensor],
                trainable: tuple[str, ...], dst: str | Path, fingerprint_of: object,
                desc: str, progress: bool = True, **settings
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """End-to-end distillation (Llama family): minimise KL(teacher || student) of the
    next-token distributions on calibration windows (half chat, ``e2e_chat_mix``), training
    only the attention projections named in `trainable` (model_patches.evaluation.tasks.ThinLM); the
    teacher is the source model, the student the source's tensors with `overrides` replacing
    theirs (read once for both). Progress is saved every `e2e_save_every` steps next to the
    destination and a re-run with the same student, settings and `fingerprint_of` resumes.
    Returns (the trained weights as checkpoint tensors, a JSON-able report)."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from model_patches.conversion.calibration_data import calibration_windows
    from model_patches.evaluation.tasks import ThinLM, load_checkpoint
    from model_patches.evaluation.text_sets import token_stream

    opts = {k: v for k, v in {**E2E_DEFAULTS, **settings}.items() if k.startswith("e2e_")}
    src, dst = Path(src), Path(dst)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src_cfg, src_sd = load_checkpoint(src)
    teacher = ThinLM(src_cfg, src_sd).to_device(dev).eval()
    student = ThinLM(student_cfg, {**src_sd, **overrides}, trainable=trainable).to_device(dev)
    tok = AutoTokenizer.from_pretrained(str(src))
    seq, bsz, steps = opts["e2e_seq_len"], opts["e2e_batch"], opts["e2e_steps"]
    n_windows = len(token_stream(tok, "calibration")) // seq
    windows = calibration_windows(tok, seq, n_windows, opts["e2e_chat_mix"]).to(dev)
    params = list(student.trained.parameters())
    opt = torch.optim.Adam(params, lr=opts["e2e_lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    work = dst.parent / f".{dst.name}.calib"
    work.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(src, fingerprint_of,
                      {**opts, "init": hashlib.sha256(b"".join(
                          overrides[k].numpy().tobytes()[:4096] for k in sorted(overrides)
                          if k.endswith(tuple(f"{n}.weight" for n in trainable)))).hexdigest()})
    start, hist = 0, []
    if (work / "e2e.pt").exists():
        saved = torch.load(work / "e2e.pt", map_location=dev)
        if saved.get("fingerprint") == fp:
            start, hist = saved["step"], saved["losses"]
            with torch.no_grad():
                for p, w in zip(params, saved["params"]):
                    p.copy_(w)
            opt.load_state_dict(saved["opt"])
            sched.load_state_dict(saved["sched"])
    gen = torch.Generator().manual_seed(1234)
    order = torch.randperm(len(windows), generator=gen)
    t0 = time.time()
    bar = tqdm(range(start, steps), desc=desc, unit="step",
               disable=not progress, initial=start, total=steps)
    for step in bar:
        idx = order[(torch.arange(bsz) + step * bsz) % len(windows)]
        ids = windows[idx.to(dev)]
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher(ids).float(), -1)
        s_logp = torch.log_softmax(student(ids).float(), -1)
        loss = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        hist.append(round(loss.item(), 5))
        bar.set_postfix(kl=f"{loss.item():.4f}")
        if (step + 1) % opts["e2e_save_every"] == 0 or step + 1 == steps:
            torch.save({"fingerprint": fp, "step": step + 1, "losses": hist,
                        "params": [p.detach().cpu().clone() for p in params],
                        "opt": opt.state_dict(), "sched": sched.state_dict()}, work / "e2e.pt")
    report = {"recipe": f"end-to-end KL(teacher || student), {'/'.join(trainable)}",
              "device": str(dev), "steps": steps, "seq_len": seq, "batch": bsz, "lr": opts["e2e_lr"],
              "chat_mix": opts["e2e_chat_mix"],
              "tokens_seen": steps * seq * bsz, "seconds": round(time.time() - t0, 1),
              "kl_first": hist[:5], "kl_last": hist[-5:]}
    return student.trained_state(), report


def cleanup(dst: str | Path) -> None:
    """Remove the resumable progress of a finished calibration."""
    import shutil
    dst = Path(dst)
    shutil.rmtree(dst.parent / f".{dst.name}.calib", ignore_errors=True)


def e2e_checkpoint(src: str | Path, ckpt: str | Path, dst: str | Path, progress: bool = True,
                   force: bool = False, **settings) -> Path:
    """Run the end-to-end pass on an existing factored checkpoint (e.g. a layer-wise calibrated
    one) and write the result to dst (the layer-wise stage is not repeated)."""
    from engine.checkpoint import BLOCK
    from model_patches.evaluation.tasks import load_checkpoint
    from model_patches.conversion.checkpoint_writer import write_factored

    src, dst = Path(src), Path(dst)
    fcfg, st = load_checkpoint(ckpt)
    block = dict(fcfg[BLOCK])
    cfg = json.loads((src / "config.json").read_text())
    thin = {k: v for k, v in st.items() if k.endswith(("q_proj.weight", "k_proj.weight"))}
    state, rep = e2e_thin_qk(src, cfg, thin, block, dst, progress=progress, **settings)
    from engine.reference import load_state_dict
    full = {**load_state_dict(src), **state}
    block["method"] = f"{block['method']}+e2e"
    block["calibration"] = {**(block.get("calibration") or {}), "e2e": rep}
    write_factored(src, dst, cfg=cfg, family="llama", state=full, block=block, force=force)
    cleanup(dst)
    return dst


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
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from model_patches.conversion.checkpoint_writer import source_inv_freq
    from model_patches.evaluation.text_sets import token_stream

    opts = {**DEFAULTS, **settings}
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    n_layers, h, n_kv, d, hidden = model_dims(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).to(dev).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    src_kv = model.config.num_key_value_heads
    tok = AutoTokenizer.from_pretrained(str(src))
    seq = opts["seq_len"]
    ids = torch.tensor(token_stream(tok, "calibration")[: opts["tokens"]])
    ids = ids[: len(ids) // seq * seq].view(-1, seq).to(dev)
    pos = torch.arange(seq, device=dev)
    inv, scaling = source_inv_freq(cfg)
    src_rope = ThinRotaryEmbedding(inv[None].expand(src_kv, -1).double(), h, scaling).to(dev)
    new_rope = ThinRotaryEmbedding(inv[None].expand(n_kv, -1).double(), h, scaling).to(dev)
    scale = d ** -0.5
    state, losses, t0 = dict(state), [], time.time()
    with torch.no_grad():
        x = model.model.embed_tokens(ids)
    bar = tqdm(range(n_layers), desc="recovering merged attention", unit="layer",
               disable=not progress)
    for i in bar:
        L = model.model.layers[i]
        a = L.self_attn
        p = f"model.layers.{i}.self_attn"
        with torch.no_grad():
            n = L.input_layernorm(x)
            target = a.o_proj(_attn(a.q_proj(n), a.k_proj(n), a.v_proj(n), h, src_kv, d, d,
                                    scale, src_rope, pos))
        names = [f"{p}.{m}_proj.{t}" for m in "qkvo" for t in ("weight", "bias")
                 if f"{p}.{m}_proj.{t}" in state]
        w = {k: state[k].clone().to(dev).requires_grad_(True) for k in names}
        opt = torch.optim.Adam(list(w.values()), lr=opts["lr"])
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, opts["steps"])
        gen = torch.Generator().manual_seed(i)
        norm = target.pow(2).mean().clamp_min(1e-12)

        def out(idx):
            lin = {m: F.linear(n[idx], w[f"{p}.{m}_proj.weight"], w.get(f"{p}.{m}_proj.bias"))
                   for m in "qkv"}
            o = _attn(lin["q"], lin["k"], lin["v"], h, n_kv, d, d, scale, new_rope, pos)
            return F.linear(o, w[f"{p}.o_proj.weight"], w.get(f"{p}.o_proj.bias"))

        def loss_on(idx):
            return (out(idx) - target[idx]).pow(2).mean() / norm

        everything = torch.arange(len(ids), device=dev)
        with torch.no_grad():
            before = loss_on(everything).item()
        for _ in range(opts["steps"]):
            loss = loss_on(torch.randperm(len(ids), generator=gen)[: opts["batch"]].to(dev))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            after = loss_on(everything).item()
            state.update({k: v.detach().cpu() for k, v in w.items()})
            x = x + out(everything)
            x = x + L.mlp(L.post_attention_layernorm(x))
        losses.append({"layer": i, "relative_mse_before": before, "relative_mse_after": after})
        bar.set_postfix(rel_mse=f"{before:.3f}->{after:.3f}")
    report = {"recipe": "sequential layer-wise attention-output matching, q/k/v/o",
              "tokens": int(ids.numel()), "seq_len": seq, "steps_per_layer": opts["steps"],
              "batch": opts["batch"], "lr": opts["lr"], "device": str(dev),
              "seconds": round(time.time() - t0, 1), "layers": losses}
    if opts.get("e2e_steps", 0) > 0:
        del model, x, n, target
        trained, report["e2e"] = e2e_distill(
            src, cfg, state, ("q_proj", "k_proj", "v_proj", "o_proj"), dst,
            {"kv_head_merge": cfg.get("kv_head_merge"), "layerwise": report["layers"]},
            "end-to-end merged attention", progress, **settings)
        state = {**state, **trained}
    return state, report
