"""Quality of L2-norm KV eviction on the default model (`make bench-eviction-quality`).

    python -m model_patches.eviction_quality [--keeps 0.5,0.25,0.1] [--sink 4] [--window 64] ...

Eviction (engine/eviction/policy.py, the same as the engine and engine.reference): a prompt of
L tokens is prefilled with full causal attention; then per layer and KV head only the keys
``policy.select(‖k‖₂)`` (and their values) stay in the cache; later tokens attend to those plus
every token after the prompt, at their logical RoPE positions. Here the cache is compacted
literally (:func:`evict_cache`) and later tokens run on it (``ThinLM`` with ``pos0``);
tests/test_eviction_reference.py checks this against ``engine.reference`` and transformers.

Metrics (plain batched torch, float32), written between the quality markers of
docs/results/eviction.md:

* **perplexity**, sliding windows of 2048 held-out Wikipedia tokens (model_patches.wiki_data,
  evaluation split) at stride 1024: the first 1024 tokens are the evicted prompt, the last 1024
  are scored teacher-forced on the evicted cache (the first of them is predicted by the
  prompt's last row, which eviction cannot change);
* **needle in a haystack** at 2k / 4k tokens: real held-out text, a fact sentence
  (" <name>'s favourite <thing> is <value>.") at a random sentence boundary, a question at the
  end, greedy answer, exact match of the value;
* **passkey** at 2k / 4k (model_patches.evaluate.passkey_prompts, extract_passkey).

Retrieval is scored in two modes: *context* (the default, stricter): the prompt that is
evicted is everything before the question; the question is fed afterwards on the evicted
cache, so every answer token depends on the kept keys; *engine*: the question is part of the
evicted prompt (what ``factorkv serve --kv-evict`` does to one request); the first answer token
then comes from the prefill and only the later ones see the evicted cache.

Per-item results are cached in ``~/.cache/factorkv/eviction/results.json`` (keyed by the
settings and the checkpoint fingerprint): an interrupted or repeated run only computes what is
missing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shlex
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.eviction.policy import DEFAULT_SINK, DEFAULT_WINDOW, EvictionPolicy
from model_patches.evaluate import ThinLM, token_nll

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
REPORT = Path(__file__).resolve().parent.parent / "docs" / "results" / "eviction.md"
PLOT = "eviction-quality.png"


# ---------------------------------------------------------------------------- eviction math
def evict_cache(cache: list, policy: EvictionPolicy) -> list:
    """Compact a KV cache (per layer (k [B, H_kv, L, r], v [B, H_kv, L, D]), k after RoPE) to
    the positions ``policy.select(‖k‖₂)`` of each sequence, layer and KV head, in order. Every
    head keeps the same count, so the result is again a dense cache [B, H_kv, kept, ·]."""
    out = []
    for k, v in cache:
        sel = torch.stack([policy.select(kb.float().norm(dim=-1)) for kb in k])   # [B, H_kv, n]
        out.append((k.gather(2, sel[..., None].expand(-1, -1, -1, k.shape[-1])),
                    v.gather(2, sel[..., None].expand(-1, -1, -1, v.shape[-1]))))
    return out


@torch.no_grad()
def run_on_cache(model: ThinLM, cache: list, ids: list[int] | torch.Tensor, pos0: int
                 ) -> tuple[torch.Tensor, list]:
    """Teacher-force ids [T] at logical positions pos0.. on a (possibly evicted) cache; returns
    (hidden states [T, hidden], the extended cache). ``cache`` itself is not modified."""
    ext = list(cache)
    hs = model.hidden_states(torch.as_tensor(ids, dtype=torch.long)[None], ext, pos0=pos0)
    return hs[0], ext


@torch.no_grad()
def greedy_on_cache(model: ThinLM, cache: list, pos0: int, first: int, max_new: int,
                    stop: set[int] = frozenset()) -> list[int]:
    """Greedy tokens after ``first`` (already chosen, at position pos0): feeds one token at a
    time on the cache; returns [first, ...] (at most max_new tokens)."""
    out, ext = [first], list(cache)
    while len(out) < max_new and out[-1] not in stop:
        hs = model.hidden_states(torch.tensor([[out[-1]]]), ext, pos0=pos0 + len(out) - 1)
        out.append(int(model.logits(hs[0, -1]).argmax()))
    return out
