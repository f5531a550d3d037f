"""Long-range terms of the layer-wise calibration (model_patches.conversion.calibrate).

Row weights (``retrieval_weight``): query rows that retrieve one token from far back weigh
more in a layer's loss (:func:`long_range_weights`).

Long windows (``long_steps`` > 0): 256-token windows give each query at most 255 distractor
keys, so a compact key's score noise over the thousands of a long context (attention mass
drifting onto distant keys) is never trained. After a layer's short-window steps, ``long_steps``
more steps each add, to a batch of the short windows' loss, the relative attention-output
error of the last ``long_tail`` query rows of ``long_batch`` calibration windows of
``long_seq_len`` tokens, keys over the whole window:

    loss = short loss + ‖Attn_student,i(n_L)[-tail:] − Attn_teacher,i(n_L)[-tail:]‖² / ‖·_teacher‖²

(TorchCausalLM.attention_last_rows: tail / long_seq_len of a long window's attention work, so
a step costs about as much as 8 more short windows rather than 64). The long windows' hidden
states are the student's own, propagated layer by layer beside the short ones.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.torch_model import TorchCausalLM
from model_patches.conversion.calibration_data import window_counts
from model_patches.conversion.checkpoint_writer import ConversionError

# retrieval_weight's default distance: a key this many positions back counts as far
RETRIEVAL_DISTANCE = 64
# the long-window stage's settings (off while long_steps = 0)
LONG_DEFAULTS = {"long_steps": 0, "long_seq_len": 2048, "long_tail": 256, "long_windows": 24,
                 "long_batch": 2, "long_lr": 5e-4}


def check_long_windows(tok, cfg: dict, opts: dict) -> None:
    """Raise ConversionError (one line) unless the long-window stage (long_steps > 0) under
    `opts` fits the model's positions and its windows can be built from `tok`'s text."""
    o = {**LONG_DEFAULTS, **opts}
    if not o["long_steps"]:
        return
    longest = cfg.get("max_position_embeddings", cfg.get("n_positions", 0))
    if not 0 < o["long_tail"] < o["long_seq_len"] <= longest:
        raise ConversionError(f"calibration long windows of {o['long_seq_len']} tokens with a "
                              f"{o['long_tail']}-row tail do not fit the model's {longest} positions")
    window_counts(tok, o["long_seq_len"], o["long_windows"], o.get("chat_mix", 0.0))


def long_range_weights(teacher: TorchCausalLM, i: int, n: torch.Tensor, pos: torch.Tensor,
                       strength: float, distance: int, chunk: int = 16) -> torch.Tensor:
    """[N, T] per-query-row loss weights 1 + strength · m, m = the largest attention
    probability the teacher's layer i gives, in any head, to one key at least ``distance``
    positions back (the window's first token, the attention sink, left out): rows that
    retrieve one token from far back weigh up to 1 + strength, diffuse rows (m ~ 1/T) ~1."""
    out = []
    for s in range(0, len(n), chunk):
        rows = n[s:s + chunk]
        at = pos[s:s + chunk] if pos.dim() == 2 else pos.expand(len(rows), -1)
        probs = teacher.attention_probs(i, rows, at)                            # [B, H, T, T]
        far = (at[:, :, None] - at[:, None, :]) >= distance                     # [B, T, T]
        far[:, :, 0] = False
        out.append(1 + strength * (probs * far[:, None]).amax((1, 3)))
    return torch.cat(out)


def long_window_steps(teacher: TorchCausalLM, student: TorchCausalLM, i: int,
                      params: list[torch.nn.Parameter], short_loss: Callable, n_short: int,
                      long_x: torch.Tensor, long_pos: torch.Tensor, opts: dict,
                      gen: torch.Generator) -> dict:
    """Continue layer i's training of ``params`` (Adam, lr ``long_lr``, cosine) for
    ``long_steps`` steps of short_loss(a batch of ``batch`` of the n_short short windows) + the
    long windows' tail error (module docstring); long_x: the student's hidden states [N_L, T_L,
    hidden] at layer i, long_pos [T_L]. Returns the tail's relative error on every long window
    before and after."""
    o = {**LONG_DEFAULTS, **opts}
    tail = o["long_tail"]

    def tails(model):                          # every window's tail, 4 windows at a time
        return torch.cat([model.attention_last_rows(i, n[w:w + 4], long_pos, tail)
                          for w in range(0, len(n), 4)])

    with torch.no_grad():
        n = student.attn_norm(i, long_x)
        target = tails(teacher)
    norm = target.pow(2).mean().clamp_min(1e-12)

    def tail_error(idx):
        return (student.attention_last_rows(i, n[idx], long_pos, tail) - target[idx]
                ).pow(2).mean() / norm

    def error_everywhere():
        with torch.no_grad():
            return ((tails(student) - target).pow(2).mean() / norm).item()

    before = error_everywhere()
    opt = torch.optim.Adam(params, lr=o["long_lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, o["long_steps"])
    for _ in range(o["long_steps"]):
        short = torch.randperm(n_short, generator=gen)[: opts["batch"]].to(n.device)
        long = torch.randperm(len(n), generator=gen)[: o["long_batch"]].to(n.device)
        loss = short_loss(short) + tail_error(long)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return {"long_tail_mse_before": before, "long_tail_mse_after": error_everywhere()}
