"""End-to-end distillation: KL(teacher || student) of next-token distributions, training a
chosen set of attention projections of every layer (engine.torch_model.TorchCausalLM is both
teacher and student). Used after the layer-wise stage of model_patches.conversion.calibrate
(thin q/k) and of KV-head merging (q/k/v/o), and on its own by :func:`e2e_checkpoint`.

Progress lives next to the destination (``.<dst>.calib/``), keyed by a fingerprint of the
source, the student and the settings, so an interrupted run resumes; :func:`cleanup` removes
it when the checkpoint is written. Runs on CUDA when available.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import AutoTokenizer

from engine.checkpoint import FactoredKeysConfig
from engine.torch_model import TorchCausalLM
from engine.weights import load_checkpoint, load_state_dict
from model_patches.conversion.calibration_data import (calibration_windows, skipped_positions,
                                                       window_counts)
from model_patches.conversion.checkpoint_writer import write_factored
from model_patches.text_sets import token_stream

# Optional end-to-end pass after the layer-wise one (e2e_steps = 0: off).
E2E_DEFAULTS = {"e2e_steps": 0, "e2e_seq_len": 256, "e2e_batch": 4, "e2e_lr": 1e-4,
                "e2e_save_every": 10, "e2e_chat_mix": 0.5}


def fingerprint(src: Path, block: dict, settings: dict) -> str:
    h = hashlib.sha256(json.dumps([str(src.resolve()), block, settings], sort_keys=True,
                                  default=str).encode())
    return h.hexdigest()[:16]


def weights_digest(state: dict[str, torch.Tensor], suffixes: tuple[str, ...]) -> str:
    """Short hash of the tensors of `state` whose names end with one of `suffixes` (first 4 KiB
    of each): part of a progress fingerprint, so progress made from other initial weights is
    not resumed."""
    return hashlib.sha256(b"".join(state[k].detach().cpu().contiguous().numpy().tobytes()[:4096]
                                   for k in sorted(state) if k.endswith(suffixes))).hexdigest()


def cleanup(dst: str | Path) -> None:
    """Remove the resumable progress of a finished calibration."""
    dst = Path(dst)
    shutil.rmtree(dst.parent / f".{dst.name}.calib", ignore_errors=True)


def e2e_window_set(tok, settings: dict) -> dict:
    """calibration_windows' arguments for the end-to-end stage: as many windows as the
    Wikipedia calibration stream holds, ``e2e_chat_mix`` of them chat and ``e2e_varied_mix``
    (when given) from the varied texts. Checked (calibration_data.window_counts): raises
    ConversionError when the texts are too short for the set."""
    opts = {**E2E_DEFAULTS, **settings}
    seq = opts["e2e_seq_len"]
    args = {"seq_len": seq, "n": len(token_stream(tok, "calibration")) // seq,
            "chat_mix": opts["e2e_chat_mix"], "varied_mix": opts.get("e2e_varied_mix", 0.0)}
    window_counts(tok, **args)
    return args


def e2e_thin_qk(src: str | Path, cfg: dict, state: dict[str, torch.Tensor], fk: FactoredKeysConfig,
                dst: str | Path, progress: bool = True, **settings
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """End-to-end QK-only distillation (Llama family) of a factored student: e2e_distill with
    only the thin q/k weights trained."""
    block = fk.to_block()
    student_cfg = {**cfg, "factored_keys": block, "architectures": ["FactoredLlamaForCausalLM"]}
    fp_block = {k: v for k, v in block.items() if k != "calibration"}
    names = ("q_proj", "k_proj", "k_up_proj") if fk.latent else ("q_proj", "k_proj")
    trained, report = e2e_distill(src, student_cfg, state, names, dst, fp_block,
                                  f"end-to-end {fk.key_mode} keys", progress, **settings)
    report["recipe"] = "end-to-end KL(teacher || student), QK only"
    return {**state, **trained}, report


def e2e_distill(src: str | Path, student_cfg: dict, overrides: dict[str, torch.Tensor],
                trainable: tuple[str, ...], dst: str | Path, fingerprint_of: object,
                desc: str, progress: bool = True, **settings
                ) -> tuple[dict[str, torch.Tensor], dict]:
    """End-to-end distillation (Llama family): minimise KL(teacher || student) of the
    next-token distributions on calibration windows (half chat, ``e2e_chat_mix``; a fraction
    ``e2e_varied_mix`` from the varied texts when given; with ``e2e_pos_skip``, half of them
    at PoSE-style positions, calibration_data.skipped_positions), training
    only the attention projections named in `trainable` (engine.torch_model.TorchCausalLM); the
    teacher is the source model, the student the source's tensors with `overrides` replacing
    theirs (read once for both). Progress is saved every `e2e_save_every` steps next to the
    destination and a re-run with the same student, settings and `fingerprint_of` resumes.
    Returns (the trained weights as checkpoint tensors, a JSON-able report)."""
    opts = {k: v for k, v in {**E2E_DEFAULTS, **settings}.items() if k.startswith("e2e_")}
    src, dst = Path(src), Path(dst)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    src_cfg, src_sd = load_checkpoint(src)
    teacher = TorchCausalLM(src_cfg, src_sd).to_device(dev).eval()
    student = TorchCausalLM(student_cfg, {**src_sd, **overrides})
    params = student.make_trainable([f"{student.prefix(i)}.{n}.weight"
                                     for i in range(student.n_layers) for n in trainable])
    student.to_device(dev)
    tok = AutoTokenizer.from_pretrained(str(src))
    seq, bsz, steps = opts["e2e_seq_len"], opts["e2e_batch"], opts["e2e_steps"]
    windows = calibration_windows(tok, **e2e_window_set(tok, opts)).to(dev)
    # e2e_pos_skip = P > 0: half the windows at PoSE-style positions < P (skipped_positions)
    positions = (skipped_positions(len(windows), seq, opts["e2e_pos_skip"], seed=1)
                 if opts.get("e2e_pos_skip") else torch.arange(seq).expand(len(windows), -1)
                 ).to(dev)
    opt = torch.optim.Adam(params, lr=opts["e2e_lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    work = dst.parent / f".{dst.name}.calib"
    work.mkdir(parents=True, exist_ok=True)
    fp = fingerprint(src, fingerprint_of, {**opts, "init": weights_digest(
        overrides, tuple(f"{n}.weight" for n in trainable))})
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
        ids, at = windows[idx.to(dev)], positions[idx.to(dev)]
        with torch.no_grad():
            t_logp = torch.log_softmax(teacher(ids, positions=at).float(), -1)
        s_logp = torch.log_softmax(student(ids, positions=at).float(), -1)
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
              **({"varied_mix": opts["e2e_varied_mix"]} if "e2e_varied_mix" in opts else {}),
              **({"pos_skip": opts["e2e_pos_skip"]} if opts.get("e2e_pos_skip") else {}),
              "tokens_seen": steps * seq * bsz, "seconds": round(time.time() - t0, 1),
              "kl_first": hist[:5], "kl_last": hist[-5:]}
    return student.trained_state(), report


def e2e_checkpoint(src: str | Path, ckpt: str | Path, dst: str | Path, progress: bool = True,
                   force: bool = False, **settings) -> Path:
    """Run the end-to-end pass on an existing factored checkpoint (e.g. a layer-wise calibrated
    one) and write the result to dst (the layer-wise stage is not repeated)."""
    src, dst = Path(src), Path(dst)
    fcfg, st = load_checkpoint(ckpt)
    fk = FactoredKeysConfig.from_hf_config(fcfg)
    cfg = json.loads((src / "config.json").read_text())
    thin = {k: v for k, v in st.items()
            if k.endswith(("q_proj.weight", "k_proj.weight", "k_up_proj.weight"))}
    state, rep = e2e_thin_qk(src, cfg, thin, fk, dst, progress=progress, **settings)
    full = {**load_state_dict(src), **state}
    fk = replace(fk, method=f"{fk.method}+e2e", calibration={**(fk.calibration or {}), "e2e": rep})
    write_factored(src, dst, cfg=cfg, family="llama", state=full, fk=fk, force=force)
    cleanup(dst)
    return dst
