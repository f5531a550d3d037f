"""Calibration windows: chat-template conversations from calibration articles only, mixed
with prose in the asked proportion, deterministic; varied calibration text (opt-in) in its
proportion, and the default windows exactly as before the option."""

from __future__ import annotations

import re

import pytest
import torch

from model_patches.conversion.calibration_data import (calibration_windows, chat_windows,
                                                      skipped_positions, varied_windows,
                                                      window_counts)
from model_patches.conversion.checkpoint_writer import ConversionError
from model_patches.text_sets import VARIED_TEXTS, split, token_stream


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def test_chat_windows_are_conversations_from_calibration_articles(tok):
    w = chat_windows(tok, 256, 9, seed=3)
    assert w.shape == (9, 256)
    assert torch.equal(w, chat_windows(tok, 256, 9, seed=3))
    start = tok.convert_tokens_to_ids("<|im_start|>")
    texts = [tok.decode(r) for r in w]
    assert all(r[0] == start for r in w)                   # each starts a conversation
    assert all(t.startswith("<|im_start|>system\n") for t in texts)
    joined = "\n".join(texts)
    for kind in ("Tell me about ", "Repeat the first two sentences", "What is the code?"):
        assert kind in joined, kind
    # a recall turn's answer repeats the code hidden in its user message
    for code in re.findall(r"What is the code\?<\|im_end\|>\n<\|im_start\|>assistant\nThe code is (\d{5})", joined):
        assert joined.count(f"The code is {code}.") >= 2
    eval_titles = {t for t, _ in split()[1]}
    asked = set(re.findall(r"Tell me about (.+?)\.<\|im_end\|>", joined))
    assert asked and not asked & eval_titles


def test_mix_proportion(tok):
    for mix, want in ((0.0, 0), (0.25, 4), (1.0, 16)):
        w = calibration_windows(tok, 128, 16, chat_mix=mix)
        assert w.shape == (16, 128)
        chats = sum(tok.decode(r[:4]).startswith("<|im_start|>system") for r in w)
        assert chats == want


def _old_calibration_windows(tok, seq_len, n, chat_mix=0.0, seed=0):
    """calibration_windows as it was before varied_mix existed (the reference)."""
    n_chat = round(n * chat_mix) if getattr(tok, "chat_template", None) else 0
    stream = torch.tensor(token_stream(tok, "calibration"))
    wiki = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)[: n - n_chat]
    if n_chat == 0:
        return wiki
    mixed = torch.cat((wiki, chat_windows(tok, seq_len, n_chat, seed)))
    return mixed[torch.randperm(len(mixed), generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("chat_mix, seed", [(0.0, 0), (0.5, 0), (0.25, 3)])
def test_default_is_unchanged(tok, chat_mix, seed):
    want = _old_calibration_windows(tok, 128, 16, chat_mix, seed)
    assert torch.equal(calibration_windows(tok, 128, 16, chat_mix, seed), want)
    assert torch.equal(calibration_windows(tok, 128, 16, chat_mix, seed, varied_mix=0.0), want)


def _rows(tok, name, seq_len):
    """Every window of seq_len consecutive tokens of a text's stream, as tuples."""
    s = torch.tensor(token_stream(tok, name))
    return {tuple(r.tolist()) for r in s[: len(s) // seq_len * seq_len].view(-1, seq_len)}


def test_varied_mix(tok):
    w = calibration_windows(tok, 128, 16, chat_mix=0.25, varied_mix=0.25, seed=1)
    assert w.shape == (16, 128)
    assert torch.equal(w, calibration_windows(tok, 128, 16, chat_mix=0.25, varied_mix=0.25, seed=1))
    kinds = {name: _rows(tok, name, 128) for name in ("calibration", *VARIED_TEXTS)}
    count = dict.fromkeys(("chat", "calibration", *VARIED_TEXTS), 0)
    for r in w:
        if tok.decode(r[:4]).startswith("<|im_start|>system"):
            count["chat"] += 1
            continue
        (name,) = [k for k, rows in kinds.items() if tuple(r.tolist()) in rows]
        count[name] += 1
    assert count == {"chat": 4, "calibration": 8, "python-docs": 2, "newsgroups": 2}
    # varied windows alone: split between the texts, spread over each whole stream
    v = varied_windows(tok, 128, 5)
    assert [tuple(r.tolist()) in kinds["python-docs"] for r in v] == [True] * 3 + [False] * 2
    assert torch.equal(v[0], torch.tensor(token_stream(tok, "python-docs")[:128]))
    assert len({tuple(r.tolist()) for r in v}) == 5
    only_news = varied_windows(tok, 128, 2, ("newsgroups",))
    assert all(tuple(r.tolist()) in kinds["newsgroups"] for r in only_news)


def test_varied_mix_errors(tok):
    with pytest.raises(ValueError, match="exceed 1"):
        calibration_windows(tok, 128, 16, chat_mix=0.5, varied_mix=0.75)
    with pytest.raises(ValueError, match="windows of"):
        varied_windows(tok, 200_000, 2)                  # fewer windows than asked
    with pytest.raises(ValueError, match="Wikipedia calibration text has"):
        calibration_windows(tok, 128, 10 ** 6)           # no longer silently fewer windows
    assert window_counts(tok, 128, 16, chat_mix=0.25, varied_mix=0.25) == (8, 4, 4)
    for texts in (("news",), ("evaluation",), ("bogus",)):   # held-out text is never calibration
        with pytest.raises(ValueError, match="not calibration text"):
            varied_windows(tok, 128, 2, texts)


def test_skipped_positions_are_two_contiguous_chunks_below_the_limit():
    """Odd windows keep 0..T-1; even windows are 0..c-1 then c+u..T-1+u with u <= P - T, so
    every position is < P; the same seed gives the same positions; P < T is refused."""
    pos = skipped_positions(9, 32, 4096, seed=3)
    assert pos.shape == (9, 32) and torch.equal(pos, skipped_positions(9, 32, 4096, seed=3))
    assert all(torch.equal(pos[w], torch.arange(32)) for w in range(1, 9, 2))
    skips = []
    for w in range(0, 9, 2):
        steps = pos[w].diff()
        jumps = (steps != 1).nonzero().flatten()
        assert len(jumps) <= 1 and pos[w, 0] == 0 and pos[w].max() < 4096
        skips.append(int(steps.max()) - 1)
    assert max(skips) > 32                          # the tails do move far away
    with pytest.raises(ConversionError, match="shorter than its 32-token windows"):
        skipped_positions(2, 32, 16)
