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
                  progress: bool = True, augment: bool = False,
                  attention_weighted: bool = False) -> list[torch.Tensor]:
    """C_x[l] = E[x xᵀ] (float64) of the input of every attention block, on calibration text.
    augment: the moments of [x; 1] instead (E[x] in the last row and column), for biases.
    attention_weighted (Llama family): C_x[l] = Σ_n w_n x_n x_nᵀ / Σ_n w_n with
    w_n = sqrt(Σ_{h,m} a_{h,m,n}), the square root of the attention token n receives from every
    head and query of its window in layer l: keys that are read (attention sinks, the tokens a
    query retrieves) weigh more than keys nobody attends to."""
    # transformers is imported here: it takes seconds, and the CLI imports this module
    from transformers import AutoModelForCausalLM

    tok = source_tokenizer(src)
    model = AutoModelForCausalLM.from_pretrained(
        str(src), dtype=torch.float32,
        **({"attn_implementation": "eager"} if attention_weighted else {})).eval()
    if attention_weighted and not hasattr(model, "model"):
        raise ConversionError("attention-weighted moments need a Llama-family source")
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
    weights = [0.0] * len(norms)            # Σ_n w_n per layer (the token count when unweighted)
    inputs: dict[int, torch.Tensor] = {}

    def accumulate(i, x, w):
        sums[i].add_((x * w[:, None]).T @ x)
        weights[i] += float(w.sum())

    def norm_hook(i):
        def fn(_module, _inp, out):
            x = out.reshape(-1, out.shape[-1]).double()
            if augment:
                x = torch.cat((x, torch.ones(len(x), 1, dtype=x.dtype)), 1)
            if attention_weighted:
                inputs[i] = x                # weighted once the layer's attention is known
            else:
                accumulate(i, x, torch.ones(len(x), dtype=x.dtype))
        return fn

    def attention_hook(i):
        def fn(_module, _inp, out):
            probs = out[1]                   # [batch, heads, queries, keys] (eager attention)
            accumulate(i, inputs.pop(i), probs.double().sum(dim=(1, 2)).reshape(-1).sqrt())
        return fn
    handles = [n.register_forward_hook(norm_hook(i)) for i, n in enumerate(norms)]
    if attention_weighted:
        handles += [layer.self_attn.register_forward_hook(attention_hook(i))
                    for i, layer in enumerate(model.model.layers)]
    with torch.inference_mode():
        for w in tqdm(windows, desc="calibration statistics", unit="window", disable=not progress):
            model(w[None])
    for h in handles:
        h.remove()
    return [s / n for s, n in zip(sums, weights)]
