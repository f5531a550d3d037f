"""The benchmark's items: perplexity windows of held-out text, needle-in-a-haystack and
passkey prompts (each a dict: ids, answer, haystack, depth, question_len), their scoring, and
the retrieval tasks of a run."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

import torch

from model_patches.evaluation.tasks import PASSKEY_QUESTION, extract_passkey, passkey_prompts


def ppl_windows(stream: list[int], n: int, ctx: int = 2048, stride: int = 1024) -> torch.Tensor:
    """n windows [n, ctx] of the stream starting every ``stride`` tokens."""
    need = (n - 1) * stride + ctx
    if len(stream) < need:
        raise ValueError(f"evaluation text has {len(stream)} tokens, {need} needed")
    ids = torch.as_tensor(stream[:need], dtype=torch.long)
    return torch.stack([ids[i * stride:i * stride + ctx] for i in range(n)])


NIAH_NAMES = ("Mirela", "Tobias", "Kaito", "Ingrid", "Oskar", "Leilani", "Dario", "Annika",
              "Bartholomew", "Svetlana", "Rafael", "Yuki", "Coralie", "Emeka", "Henrike", "Priya")
NIAH_FACTS = (("colour", ("turquoise", "crimson", "lavender", "magenta", "olive", "amber")),
              ("city", ("Lisbon", "Nairobi", "Oslo", "Montreal", "Hanoi", "Quito")),
              ("fruit", ("mango", "apricot", "papaya", "kiwi", "pomegranate", "lychee")),
              ("animal", ("otter", "falcon", "walrus", "lynx", "flamingo", "hedgehog")),
              ("instrument", ("cello", "banjo", "oboe", "harp", "trombone", "accordion")),
              ("flower", ("tulip", "orchid", "daisy", "magnolia", "peony", "lilac")))
NIAH_NEEDLE = " {name}'s favourite {thing} is {value}."
NIAH_QUESTION = "\nQuestion: What is {name}'s favourite {thing}?\nAnswer: {name}'s favourite {thing} is"


def encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def niah_prompts(tok, stream: list[int], length: int, n: int, seed: int = 0,
                 per_haystack: int = 10, offset: int = 131072) -> list[dict]:
    """n needle-in-a-haystack prompts of ``length`` tokens. Haystacks are consecutive slices of
    the held-out token stream from ``offset`` (BOS/EOS removed), one per ``per_haystack``
    prompts; the needle goes after a random token that ends a sentence ('.'); then the rest of
    the haystack and the question. Each dict: ids, answer, haystack (index), depth (token index
    of the needle), question_len. Deterministic for (tokenizer, length, n, seed)."""
    rng = random.Random(f"niah-{length}-{seed}")
    special = {tok.bos_token_id, tok.eos_token_id}
    clean = [t for t in stream[offset:] if t not in special]
    out = []
    for i in range(n):
        name = rng.choice(NIAH_NAMES)
        thing, values = rng.choice(NIAH_FACTS)
        value = rng.choice(values)
        needle = encode(tok, NIAH_NEEDLE.format(name=name, thing=thing, value=value))
        question = encode(tok, NIAH_QUESTION.format(name=name, thing=thing))
        h = i // per_haystack
        head = [tok.bos_token_id] if tok.bos_token_id is not None else []
        size = length - len(head) - len(needle) - len(question)
        hay = clean[h * length:h * length + size]
        ends = [j for j in range(1, len(hay)) if tok.decode(hay[j - 1]).rstrip().endswith(".")]
        cut = rng.choice(ends) if ends else rng.randint(0, len(hay))
        out.append({"ids": head + hay[:cut] + needle + hay[cut:] + question, "answer": value,
                    "haystack": h, "depth": len(head) + cut, "question_len": len(question)})
    return out


def niah_correct(text: str, answer: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    return bool(words) and words[0].lower() == answer.lower()


def passkey_items(tok, length: int, n: int, seed: int = 0) -> list[dict]:
    """model_patches.evaluation.tasks.passkey_prompts as dicts (one shared haystack: head + filler)."""
    q = len(encode(tok, PASSKEY_QUESTION))
    return [{"ids": p.ids, "answer": p.answer, "haystack": 0, "depth": p.prefix_len,
             "question_len": q} for p in passkey_prompts(tok, length, n, seed)]


def passkey_correct(text: str, answer: str) -> bool:
    return extract_passkey(text) == answer


@dataclass(frozen=True)
class RetrievalTask:
    name: str                                  # 'niah' or 'passkey'
    length: int                                # prompt tokens
    items: list[dict]
    max_new: int                               # greedy answer tokens at most
    correct: Callable[[str, str], bool]        # (answer text, expected) -> exact match


def retrieval_tasks(tok, stream: list[int], lengths: list[int], niah_n: int, passkey_n: int,
                    seed: int) -> list[RetrievalTask]:
    """Per length: needle in a haystack (if niah_n), then passkey (if passkey_n)."""
    tasks = []
    for length in lengths:
        if niah_n:
            tasks.append(RetrievalTask("niah", length, niah_prompts(tok, stream, length, niah_n,
                                                                    seed), 6, niah_correct))
        if passkey_n:
            tasks.append(RetrievalTask("passkey", length, passkey_items(tok, length, passkey_n,
                                                                        seed), 8, passkey_correct))
    return tasks


def stop_tokens(tok) -> set[int]:
    """Greedy answers stop at EOS, <|im_end|> or a newline."""
    stop = {t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    return stop | set(encode(tok, "\n"))
