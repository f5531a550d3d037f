"""Calibration windows: plain Wikipedia text mixed with chat-formatted conversations.

Calibrating thin q/k on raw prose alone restores perplexity but not the attention patterns
of chat prompts (system prompt, ``<|im_start|>`` turns, answers that copy from the user's
text): the calibrated model then answered every chat prompt with end-of-turn. So a fraction
``chat_mix`` of the windows are conversations in the model's own chat template, built from
the same calibration articles (never the evaluation ones, model_patches.text_sets):

  ask    user: "Tell me about <title>."           assistant: a chunk of the article
  copy   user: <chunk> + "Repeat the first        assistant: the chunk's first sentences,
         sentences of this text."                 verbatim (retrieval from the context)
  recall user: <chunk with "The code is NNNNN.">  assistant: "The code is NNNNN."
         + "What is the code?"

Each conversation starts at position 0 (as served prompts do) and has as many turns as fill
``seq_len`` tokens. Deterministic for a given seed.
"""

from __future__ import annotations

import random

import torch

from model_patches.text_sets import split, token_stream

KINDS = ("ask", "copy", "recall")


def _sentences(text: str, n: int) -> str:
    parts = [p.strip() for p in text.replace("\n", " ").split(". ") if p.strip()]
    return ". ".join(parts[:n]).rstrip(".") + "."


def _conversation(kind: str, title: str, chunk: str, rng: random.Random) -> list[dict]:
    if kind == "ask":
        return [{"role": "user", "content": f"Tell me about {title}."},
                {"role": "assistant", "content": chunk}]
    if kind == "copy":
        return [{"role": "user", "content": f"{chunk}\n\nRepeat the first two sentences of this text."},
                {"role": "assistant", "content": _sentences(chunk, 2)}]
    code = f"{rng.randrange(10000, 100000)}"
    words = chunk.split(" ")
    at = rng.randrange(len(words) + 1)
    text = " ".join(words[:at] + [f"The code is {code}."] + words[at:])
    return [{"role": "user", "content": f"{text}\n\nWhat is the code?"},
            {"role": "assistant", "content": f"The code is {code}."}]


def chat_windows(tok, seq_len: int, n: int, seed: int = 0) -> torch.Tensor:
    """[n, seq_len] token ids of multi-turn chat-template conversations from the calibration
    articles: turns (kinds in rotation, chunks of one article) are added until the
    conversation fills seq_len, then it is cut there."""
    if not getattr(tok, "chat_template", None):
        raise ValueError("the tokenizer has no chat template")
    cal, _ = split()
    rng = random.Random(seed)
    out, turn = [], 0
    while len(out) < n:
        title, body = cal[rng.randrange(len(cal))]
        messages: list[dict] = []
        ids: list[int] = []
        while len(ids) < seq_len:
            size = rng.randrange(200, max(201, seq_len * 2))
            start = rng.randrange(max(1, len(body) - size))
            kind = KINDS[turn % len(KINDS)]
            turn += 1
            messages += _conversation(kind, title, body[start:start + size], rng)
            ids = tok.apply_chat_template(messages, tokenize=True)
            if not isinstance(ids, list):     # transformers may return a BatchEncoding
                ids = ids["input_ids"]
        out.append(ids[:seq_len])
    return torch.tensor(out)


def calibration_windows(tok, seq_len: int, n: int, chat_mix: float = 0.0,
                        seed: int = 0) -> torch.Tensor:
    """[n, seq_len]: round(n·chat_mix) chat windows, the rest consecutive windows of the
    Wikipedia calibration stream; interleaved (not shuffled: callers sample batches)."""
    n_chat = round(n * chat_mix) if getattr(tok, "chat_template", None) else 0
    stream = torch.tensor(token_stream(tok, "calibration"))
    wiki = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)[: n - n_chat]
    if n_chat == 0:
        return wiki
    chat = chat_windows(tok, seq_len, n_chat, seed)
    mixed = torch.cat((wiki, chat))
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))
    return mixed[order]
