"""Perplexity of training-free key initialisations of the default model (quick check).

    python -m loadtests.init_ppl [--windows 8] [--ranks 32,16] [--texts evaluation,news]
    python -m loadtests.init_ppl --keys latent --methods pca,pca-attn,qpca,qpca-attn --ranks 32,16,8

Thin keys: the thin_init methods. Latent keys (model_patches.conversion.latent_init, one joint
latent per layer): ``pca`` / ``qpca`` = plain / query-weighted PCA, ``-attn`` = on
attention-weighted input moments (latent_init.LATENT_INITS; ``pca`` is the converter's default). Evaluation: the
first `windows` × 512 tokens of each held-out text of model_patches.text_sets, plain-torch
reference (engine.torch_model), float32. Statistics: 32×512 calibration tokens. This is a small,
fast probe, not the full quality benchmark.
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
from model_patches.conversion.latent_init import (LATENT_INITS, init_latent_state, init_options,
                                                   latent_rotary_table)
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
    ap.add_argument("--keys", choices=("thin", "latent"), default="thin")
    ap.add_argument("--methods", default=None, help="thin: best-pairs,partial-rope,truncated; "
                    f"latent: {','.join(LATENT_INITS)} (default: all)")
    ap.add_argument("--texts", default="evaluation", help="held-out texts, e.g. evaluation,news")
    ap.add_argument("--work", default="/tmp/factorkv-init-ppl")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    from model_patches.conversion.default_model import prepare_default_model
    src = prepare_default_model()
    out = Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(src)
    texts = args.texts.split(",")
    ev = {t: torch.tensor(token_stream(tok, t)[: args.windows * 512]).view(-1, 512) for t in texts}
    methods = (args.methods or ",".join(LATENT_INITS if args.keys == "latent"
                                        else ("best-pairs", "partial-rope", "truncated"))).split(",")
    if args.keys == "latent" and set(methods) - set(LATENT_INITS):
        raise SystemExit(f"--methods: {sorted(set(methods) - set(LATENT_INITS))} not in {LATENT_INITS}")
    if not (out / "full").exists():
        write_full_rank(src, out / "full")
    base = {t: ppl(out / "full", w) for t, w in ev.items()}
    print(f"| method | rank | {' | '.join(f'{t} PPL | vs original' for t in texts)} |")
    print(f"| original | - | {' | '.join(f'{base[t]:.3f} | -' for t in texts)} |", flush=True)
    # only the input moments some method uses (attention-weighted ones cost a second pass)
    weightings = {init_options(m)[0] for m in methods} if args.keys == "latent" else {False}
    moments = {w: input_moments(src, 32 * 512, progress=False, attention_weighted=w)
               for w in weightings}
    cfg, sd, fam = read_source(src)
    for r in (int(x) for x in args.ranks.split(",")):
        for init in methods:
            if args.keys == "latent":
                attention_weighted, query_weighted = init_options(init)
                st = init_latent_state(cfg, sd, r, 1, moments[attention_weighted], progress=False,
                                       query_weighted=query_weighted)
                table, sc = latent_rotary_table(cfg)
            else:
                st, table, sc = init_thin_state(cfg, sd, fam, r, init, moments[False], progress=False)
            fk = FactoredKeysConfig.build(cfg, r, table, method=init, source_model=src.name,
                                          rotary_attention_scaling=sc, key_mode=args.keys)
            d = out / f"{args.keys}-{init}-{r}"
            write_factored(src, d, cfg=cfg, family=fam, state=st, fk=fk, force=True)
            cells = []
            for t, w in ev.items():
                p = ppl(d, w)
                cells.append(f"{p:.3f} | {100 * (p / base[t] - 1):+.1f}%")
            print(f"| {init} | {r} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
