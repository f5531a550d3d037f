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

Opt-in (``varied_mix``, default 0: the windows are then exactly what they were without it): a
fraction of the windows from VARIED calibration text (model_patches.text_sets.VARIED_TEXTS:
the Python language reference and Usenet posts), neither encyclopaedia prose nor any
evaluation text, so calibration does not fit Wikipedia's style alone.
"""

from __future__ import annotations

import random

import torch

from model_patches.conversion.checkpoint_writer import ConversionError
from model_patches.text_sets import CALIBRATION_TEXTS, VARIED_TEXTS, split, token_stream

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


def _varied_split(tok, seq_len: int, n: int, texts: tuple[str, ...]) -> list[tuple[str, int, int]]:
    """[(text, windows asked, windows it has)]: n split as evenly as possible between `texts`
    (the first ones get the remainder); raises ConversionError when a text is not calibration
    text or has too few windows of seq_len tokens."""
    if n and not texts:
        raise ConversionError("varied windows asked for, but no varied texts named")
    out = []
    for i, name in enumerate(texts):
        if name not in CALIBRATION_TEXTS:
            raise ConversionError(f"{name!r} is not calibration text (one of "
                                  f"{', '.join(CALIBRATION_TEXTS)})")
        k = n // len(texts) + (i < n % len(texts))
        avail = len(token_stream(tok, name)) // seq_len
        if k > avail:
            raise ConversionError(f"{name!r} has {avail} windows of {seq_len} tokens, {k} asked "
                                  "(lower the varied mix or the window length)")
        out.append((name, k, avail))
    return out


def varied_windows(tok, seq_len: int, n: int,
                   texts: tuple[str, ...] = VARIED_TEXTS) -> torch.Tensor:
    """[n, seq_len]: n windows of calibration ``texts`` (names of model_patches.text_sets.TEXTS),
    split as evenly as possible between the texts (the first ones get the remainder), each
    text's windows spread evenly over its whole token stream (cut into consecutive windows),
    in text order. Deterministic; raises ConversionError (a ValueError) when a text has too
    few windows."""
    out = []
    for name, k, avail in _varied_split(tok, seq_len, n, texts):
        stream = torch.tensor(token_stream(tok, name))
        windows = stream[: avail * seq_len].view(avail, seq_len)
        out.append(windows[torch.arange(k) * avail // max(k, 1)])
    return torch.cat(out) if out else torch.empty(0, seq_len, dtype=torch.long)


def window_counts(tok, seq_len: int, n: int, chat_mix: float = 0.0, varied_mix: float = 0.0,
                  varied_texts: tuple[str, ...] = VARIED_TEXTS) -> tuple[int, int, int]:
    """(Wikipedia, chat, varied) windows of :func:`calibration_windows`' set of n, without
    building it: round(n·chat_mix) chat windows (0 without a chat template), round(n·varied_mix)
    varied ones, the rest Wikipedia. Raises ConversionError (one line; a ValueError) when the
    mixes exceed 1 or a text has too few windows, so a converter can check every stage's
    set before spending minutes on the first."""
    if not (0 <= chat_mix <= 1 and 0 <= varied_mix <= 1):
        raise ConversionError(f"calibration mixes must be in [0, 1] (chat {chat_mix}, "
                              f"varied {varied_mix})")
    n_chat = round(n * chat_mix) if getattr(tok, "chat_template", None) else 0
    n_varied = round(n * varied_mix)
    if n_chat + n_varied > n:
        raise ConversionError(f"the chat mix {chat_mix} + the varied mix {varied_mix} exceed 1")
    n_wiki = n - n_chat - n_varied
    avail = len(token_stream(tok, "calibration")) // seq_len
    if n_wiki > avail:
        raise ConversionError(f"the Wikipedia calibration text has {avail} windows of {seq_len} "
                              f"tokens, {n_wiki} asked (lower the calibration tokens)")
    _varied_split(tok, seq_len, n_varied, tuple(varied_texts))
    return n_wiki, n_chat, n_varied


def calibration_windows(tok, seq_len: int, n: int, chat_mix: float = 0.0,
                        seed: int = 0, varied_mix: float = 0.0,
                        varied_texts: tuple[str, ...] = VARIED_TEXTS) -> torch.Tensor:
    """[n, seq_len]: the windows counted by :func:`window_counts` (chat windows, windows of the
    varied texts (:func:`varied_windows`), the rest consecutive windows of the Wikipedia
    calibration stream); interleaved (not shuffled: callers sample batches). varied_mix = 0
    (default) gives exactly the windows of before the option existed."""
    n_wiki, n_chat, n_varied = window_counts(tok, seq_len, n, chat_mix, varied_mix, varied_texts)
    stream = torch.tensor(token_stream(tok, "calibration"))
    wiki = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)[:n_wiki]
    if n_chat == 0 and n_varied == 0:
        return wiki
    parts = [wiki]
    if n_chat:
        parts.append(chat_windows(tok, seq_len, n_chat, seed))
    if n_varied:
        parts.append(varied_windows(tok, seq_len, n_varied, tuple(varied_texts)))
    mixed = torch.cat(parts)
    order = torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))
    return mixed[order]


def skipped_positions(n: int, seq_len: int, max_position: int, seed: int = 0) -> torch.Tensor:
    """[n, seq_len] positions for n calibration windows, PoSE-style (positional skip-wise
    training, Zhu et al. 2023): odd windows keep 0..seq_len-1; each even window is cut at a
    random c in [1, seq_len) and its tail moved by a random skip u in [0, max_position -
    seq_len]: positions 0..c-1, then c+u..seq_len-1+u. Queries of the tail thus meet the
    head's keys up to max_position - 1 back while each chunk stays contiguous text, so a
    calibration on short windows also sees the relative distances of long contexts."""
    if max_position < seq_len:
        raise ConversionError(f"calibration pos_skip {max_position} is shorter than its "
                              f"{seq_len}-token windows")
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(seq_len).repeat(n, 1)
    for w in range(0, n, 2):
        cut = int(torch.randint(1, seq_len, (1,), generator=gen))
        pos[w, cut:] += int(torch.randint(0, max_position - seq_len + 1, (1,), generator=gen))
    return pos
