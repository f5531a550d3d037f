"""Perplexity of training-free thin-key initialisations of the default model (quick check).

    python -m loadtests.init_ppl [--windows 8] [--ranks 32,16]

Evaluation: the first `windows` × 512 tokens of the held-out split of model_patches.text_sets,
plain-torch reference (engine.torch_model), float32. Statistics for the data-aware init: 32×512
calibration tokens. This is a small, fast probe, not the full quality benchmark.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from engine.checkpoint import FactoredKeysConfig
from engine.torch_model import TorchCausalLM
from model_patches.conversion.activation_stats import input_moments
from model_patches.conversion.convert import init_thin_state
from model_patches.conversion.checkpoint_writer import read_source, write_factored, write_full_rank
from model_patches.text_sets import token_stream


def ppl(path: Path, windows: torch.Tensor) -> float:
    model, nll, n = TorchCausalLM.from_dir(path), 0.0, 0
    with torch.inference_mode():
        for w in windows:
            lp = torch.log_softmax(model(w)[:-1], -1)
            nll -= lp.gather(1, w[1:, None]).sum().item()
            n += len(w) - 1
    return math.exp(nll / n)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--ranks", default="32,16")
    ap.add_argument("--methods", default="best-pairs,partial-rope,truncated")
    ap.add_argument("--work", default="/tmp/factorkv-init-ppl")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from model_patches.conversion.default_model import prepare_default_model
    src = prepare_default_model()
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    ev = torch.tensor(token_stream(tok, "evaluation")[: args.windows * 512]).view(-1, 512)
    if not (out / "full").exists():
        write_full_rank(src, out / "full")
    base = ppl(out / "full", ev)
    print(f"| original | - | {base:.2f} | - |", flush=True)
    moments = input_moments(src, 32 * 512, progress=False)
    cfg, sd, fam = read_source(src)
    for r in (int(x) for x in args.ranks.split(",")):
        for init in args.methods.split(","):
            st, table, sc = init_thin_state(cfg, sd, fam, r, init, moments, progress=False)
            fk = FactoredKeysConfig.build(cfg, r, table, method=init, source_model=src.name,
                                          rotary_attention_scaling=sc)
            d = out / f"{init}-{r}"
            write_factored(src, d, cfg=cfg, family=fam, state=st, fk=fk, force=True)
            p = ppl(d, ev)
            print(f"| {init} | {r} | {p:.2f} | {100 * (p / base - 1):+.0f}% |", flush=True)


if __name__ == "__main__":
    main()
