"""Calibration statistics of a source model's attention inputs, shared by the converters.

`input_moments(src)` runs the source on calibration text (the calibration split of
model_patches.text_sets, disjoint from evaluation) and returns, for every layer,
the second moment C_x = E[x xᵀ] of its attention input. The thin-key initialisation
(convert, thin_init) and KV head merging (head_merge) both start from these moments.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from model_patches.conversion.checkpoint_writer import ConversionError
from model_patches.text_sets import token_stream

DEFAULT_STAT_TOKENS = 32 * 512


def source_tokenizer(src: str | Path):
    """The source's tokenizer, which calibration text needs. A directory without a loadable one,
    or one whose token ids reach past the model's embedding rows, is a ConversionError."""
    from transformers import AutoConfig, AutoTokenizer   # seconds to import: see input_moments

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a missing tokenizer
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ConversionError(f"{src}: no usable tokenizer (the converter reads calibration text "
                              f"with the source's tokenizer; copy its tokenizer files into "
                              f"{src}): {first.strip()}") from None
    rows = AutoConfig.from_pretrained(str(src)).vocab_size
    if len(tok) > rows:
        raise ConversionError(f"{src}: the tokenizer has {len(tok)} tokens but the model's "
                              f"embedding has only {rows} rows (a tokenizer of another model?)")
    return tok


def input_moments(src: str | Path, n_tokens: int = DEFAULT_STAT_TOKENS, seq_len: int = 512,
                  progress: bool = True, augment: bool = False) -> list[torch.Tensor]:
    """C_x[l] = E[x xᵀ] (float64) of the input of every attention block, on calibration text.
    augment: the moments of [x; 1] instead (E[x] in the last row and column), for biases."""
    # transformers is imported here: it takes seconds, and the CLI imports this module
    from transformers import AutoModelForCausalLM

    tok = source_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
    ids = torch.tensor(token_stream(tok, "calibration")[:n_tokens])
    if len(ids) < seq_len:
        raise ConversionError("not enough calibration text")
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    if hasattr(model, "model"):
        norms = [layer.input_layernorm for layer in model.model.layers]
    else:
        norms = [block.ln_1 for block in model.transformer.h]
    n = model.config.hidden_size + int(augment)
    sums = [torch.zeros(n, n, dtype=torch.float64) for _ in norms]
    count = [0]

    def hook(i):
        def fn(_module, _inp, out):
            x = out.reshape(-1, out.shape[-1]).double()
            if augment:
                x = torch.cat((x, torch.ones(len(x), 1, dtype=x.dtype)), 1)
            sums[i].add_(x.T @ x)
        return fn
    handles = [n.register_forward_hook(hook(i)) for i, n in enumerate(norms)]
    with torch.inference_mode():
        for w in tqdm(windows, desc="calibration statistics", unit="window", disable=not progress):
            model(w[None])
            count[0] += w.numel()
    for h in handles:
        h.remove()
    return [s / count[0] for s in sums]
