"""Calibration windows: chat-template conversations from calibration articles only, mixed
with prose in the asked proportion, deterministic."""

from __future__ import annotations

import re

import pytest
import torch

from model_patches.conversion.calibration_data import calibration_windows, chat_windows
from model_patches.text_sets import split


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
