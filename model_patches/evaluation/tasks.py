"""Quality tasks run on engine.torch_model.TorchCausalLM (original, factored or merged
checkpoints; batched, KV-cached):

* :func:`perplexity`: non-overlapping windows of ``ctx`` tokens; every token of a window but
  the first is scored with the window as its only context; PPL = exp(Σ NLL / #scored). On
  each held-out text of :data:`PPL_TEXTS` (Wikipedia articles and news, two kinds of text).
* :func:`passkey_prompts` / :func:`passkey_accuracy`: filler text with
  "The pass key is NNNNN. Remember it." at a random depth and a question at the end; greedy;
  exact match of the 5 digits. Prompts are built from token pieces (deterministic for a
  seed), and they share the filler prefix, so the filler's KV cache is computed once.
  :func:`passkey_forced` scores the key teacher-forced (its digits' NLL; retrieval digit by
  digit), apart from the greedy task's other question: whether to answer with a number at all.
* :func:`copy_windows` / :func:`copy_recall`: long-range copying of real text. A window of
  held-out text whose last ``span`` tokens repeat a span from near its start (so the copy is
  ``length`` − span − source tokens away); scored on the repeat's tokens but the first (which
  follows unrelated text): mean NLL and the fraction the model ranks first. Passkey asks for
  one salient number in repetitive filler; this asks for ordinary prose, wherever a user's
  document repeats itself (quotes, code, retrieved passages).
* :func:`greedy_chat`: greedy answers to chat prompts (the model's chat template).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.torch_model import TorchCausalLM, crop_cache


class EvalError(ValueError):
    """A user-fixable evaluation problem (one-line message)."""


def token_nll(model: TorchCausalLM, hidden: torch.Tensor, targets: torch.Tensor,
              chunk: int = 1024) -> torch.Tensor:
    """-log p(targets) for hidden [N, hidden] and targets [N] (lm_head in chunks)."""
    out = []
    for s in range(0, hidden.shape[0], chunk):
        lg = model.logits(hidden[s:s + chunk]).float()
        out.append(F.cross_entropy(lg, targets[s:s + chunk], reduction="none"))
    return torch.cat(out)


# held-out texts for perplexity: name (`factorkv eval --texts`) -> model_patches.text_sets name
PPL_TEXTS = {"wiki": "evaluation", "news": "news"}


def ppl_key(text: str, ctx: int, n_tokens: int) -> str:
    """Result-cache key of the perplexity on a PPL_TEXTS text (Wikipedia keeps the key it
    had before there were other texts, so cached results stay valid)."""
    return f"{'ppl' if text == 'wiki' else f'ppl-{text}'}/ctx{ctx}/tokens{n_tokens}"


def eval_windows(stream: list[int] | torch.Tensor, ctx: int, n_tokens: int,
                 name: str = "evaluation text") -> torch.Tensor:
    """Non-overlapping windows [N, ctx] covering at least n_tokens tokens of ``stream``."""
    n = math.ceil(n_tokens / ctx)
    ids = torch.as_tensor(stream, dtype=torch.long)
    if len(ids) < n * ctx:
        raise EvalError(f"{name} has {len(ids)} tokens, {n * ctx} needed")
    return ids[: n * ctx].view(n, ctx)


@torch.no_grad()
def window_nll(model: TorchCausalLM, windows: torch.Tensor, batch: int = 1,
               progress=None) -> torch.Tensor:
    """NLL [N, ctx-1] of every token but the first of each window."""
    out = []
    for s in range(0, len(windows), batch):
        w = windows[s:s + batch]
        hs = model.hidden_states(w)[:, :-1]
        nll = token_nll(model, hs.reshape(-1, hs.shape[-1]), w[:, 1:].reshape(-1))
        out.append(nll.view(len(w), -1))
        if progress is not None:
            progress.update(len(w))
    return torch.cat(out)


@torch.no_grad()
def perplexity(model: TorchCausalLM, windows: torch.Tensor, batch: int = 1, progress=None) -> dict:
    nll = window_nll(model, windows, batch, progress).double()
    return {"ppl": math.exp(nll.mean().item()), "nll_sum": nll.sum().item(),
            "tokens_scored": nll.numel(), "windows": len(windows), "ctx": windows.shape[1]}


# ---------------------------------------------------------------------------- long-range copy
COPY_SPAN, COPY_SOURCE = 32, 64     # the repeated span's length and where it is copied from


def copy_windows(stream: list[int] | torch.Tensor, length: int, n: int, span: int = COPY_SPAN,
                 source: int = COPY_SOURCE, name: str = "evaluation text") -> torch.Tensor:
    """[n, length]: n consecutive windows of ``stream``, each with tokens [length − span,
    length) replaced by its own tokens [source, source + span)."""
    if source < 0 or span < 2 or source + span > length - span:
        raise EvalError(f"a {span}-token copy of position {source} does not fit {length} tokens")
    if n < 1:
        raise EvalError(f"long-range copy needs at least 1 window, {n} asked")
    w = eval_windows(stream, length, n * length, name).clone()
    w[:, length - span:] = w[:, source:source + span]
    return w


def copy_key(text: str, length: int, n: int) -> str:
    """Result-cache key of copy_recall on a PPL_TEXTS text."""
    return f"copy/{text}/len{length}/n{n}"


def passkey_key(length: int, n: int, seed: int, forced: bool = False) -> str:
    """Result-cache key of passkey_accuracy (greedy) or passkey_forced on passkey_prompts."""
    return f"passkey{'-forced' if forced else ''}/len{length}/n{n}/seed{seed}"


@torch.no_grad()
def copy_recall(model: TorchCausalLM, windows: torch.Tensor, span: int = COPY_SPAN) -> dict:
    """Scores the repeated span of :func:`copy_windows` (its tokens 2..span, predicted from
    the window before them): mean NLL (nats/token) and ``top1``, the fraction of those tokens
    the model ranks first."""
    nll, top1 = [], []
    for w in windows:
        hs = model.hidden_states(w[None, :-1])[0, -(span - 1):]
        logits = model.logits(hs).float()
        target = w[-(span - 1):]
        nll.append(F.cross_entropy(logits, target, reduction="none"))
        top1.append(logits.argmax(-1) == target)
    nll, top1 = torch.cat(nll).double(), torch.cat(top1)
    return {"nll": nll.mean().item(), "top1": top1.float().mean().item(), "n": len(windows),
            "length": windows.shape[1], "tokens_scored": nll.numel()}


# ---------------------------------------------------------------------------- passkey
PASSKEY_HEAD = ("There is an important info hidden inside a lot of irrelevant text. "
                "Find it and memorize it. I will quiz you about the important information there.\n")
PASSKEY_FILLER = (" The grass is green. The sky is blue. The sun is yellow."
                  " Here we go. There and back again.")
PASSKEY_NEEDLE = " The pass key is {key}. Remember it."
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    ids: list[int]
    answer: str
    needle_start: int      # token index where the needle's tokens start
    needle_len: int
    prefix_len: int        # ids[:prefix_len] is head + filler, shared by every prompt


def _encode(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def passkey_prompts(tok, length: int, n: int, seed: int = 0) -> list[PasskeyPrompt]:
    """``n`` prompts of at most ``length`` tokens (and more than length - one filler unit):
    head, filler, the needle after a random whole number of filler units, filler, question.
    Deterministic for (tokenizer, length, n, seed)."""
    rng = random.Random(f"passkey-{length}-{seed}")
    head, unit, question = _encode(tok, PASSKEY_HEAD), _encode(tok, PASSKEY_FILLER), \
        _encode(tok, PASSKEY_QUESTION)
    if tok.bos_token_id is not None:
        head = [tok.bos_token_id] + head
    out = []
    for _ in range(n):
        key = str(rng.randint(10000, 99999))
        needle = _encode(tok, PASSKEY_NEEDLE.format(key=key))
        units = (length - len(head) - len(needle) - len(question)) // len(unit)
        if units < 1:
            raise EvalError(f"passkey length {length} is too short for the prompt template")
        depth = rng.randint(0, units)
        before, after = unit * depth, unit * (units - depth)
        ids = head + before + needle + after + question
        out.append(PasskeyPrompt(ids, key, len(head) + len(before), len(needle),
                                 len(head) + len(before)))
    return out


def extract_passkey(text: str) -> str:
    m = re.search(r"\d+", text)
    return m.group(0) if m else ""


@torch.no_grad()
def greedy(model: TorchCausalLM, ids: list[int], max_new: int, cache: list | None = None,
           stop: set[int] | None = None) -> list[int]:
    """Greedy continuation of ids[len(cache):] given a cache of ids' first positions."""
    cache = [] if cache is None else list(cache)
    have = cache[0][0].shape[2] if cache else 0
    x = torch.tensor([ids[have:]])
    out: list[int] = []
    for _ in range(max_new):
        hs = model.hidden_states(x, cache)[:, -1]
        nxt = int(model.logits(hs).argmax(-1))
        out.append(nxt)
        if stop and nxt in stop:
            break
        x = torch.tensor([[nxt]])
    return out


@torch.no_grad()
def _shared_prefix_cache(model: TorchCausalLM, prompts: list[PasskeyPrompt]) -> list:
    """KV cache of the longest filler prefix the prompts share (crop it to each prompt's)."""
    longest = max(prompts, key=lambda p: p.prefix_len)
    shared = longest.ids[: longest.prefix_len]
    assert all(p.ids[: p.prefix_len] == shared[: p.prefix_len] for p in prompts)
    cache: list = []
    model.hidden_states(torch.tensor([shared]), cache)
    return cache


@torch.no_grad()
def passkey_accuracy(model: TorchCausalLM, tok, prompts: list[PasskeyPrompt], max_new: int = 8,
                     progress=None) -> dict:
    """Greedy answer per prompt; exact match of the first digit run with the 5-digit key."""
    cache = _shared_prefix_cache(model, prompts)
    rows = []
    for p in prompts:
        gen = greedy(model, p.ids, max_new, crop_cache(cache, p.prefix_len))
        text = tok.decode(gen, skip_special_tokens=True)
        rows.append({"answer": p.answer, "output": text, "depth": p.needle_start / len(p.ids),
                     "correct": extract_passkey(text) == p.answer})
        if progress is not None:
            progress.update(1)
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
            "length": max(len(p.ids) for p in prompts), "rows": rows}


@torch.no_grad()
def passkey_forced(model: TorchCausalLM, tok, prompts: list[PasskeyPrompt], progress=None) -> dict:
    """Teacher-forced retrieval: each prompt followed by " <key>", one forward. Per prompt the
    NLL (nats, summed) of the key's digit tokens, and ``retrieved``: at every digit position the
    most likely of the ten digit tokens is the key's. Greedy passkey scores two things at once
    (answering with a number at all, and which number); this scores only the second."""
    digits = [_encode(tok, str(d)) for d in range(10)]
    if any(len(d) != 1 for d in digits):
        raise EvalError("passkey_forced needs a tokenizer with one token per digit")
    digit_ids = torch.tensor([d[0] for d in digits])
    digit_set = set(digit_ids.tolist())
    cache = _shared_prefix_cache(model, prompts)
    rows = []
    for p in prompts:
        key = _encode(tok, " " + p.answer)
        pos = [i for i, t in enumerate(key) if t in digit_set]
        if len(pos) != len(p.answer):
            raise EvalError(f"the tokenizer merges the digits of {p.answer!r}")
        x = torch.tensor([(p.ids + key)[p.prefix_len:-1]])
        hs = model.hidden_states(x, crop_cache(cache, p.prefix_len))[0, -len(key):]
        lp = model.logits(hs[pos]).float().log_softmax(-1)              # [digits, vocab]
        target = torch.tensor([key[i] for i in pos])
        nll = -lp.gather(1, target[:, None]).sum().item()
        best = digit_ids[lp[:, digit_ids].argmax(-1)]
        rows.append({"answer": p.answer, "key_nll": round(nll, 4),
                     "depth": p.needle_start / len(p.ids),
                     "retrieved": bool((best == target).all())})
        if progress is not None:
            progress.update(1)
    return {"retrieved": sum(r["retrieved"] for r in rows) / len(rows),
            "key_nll": sum(r["key_nll"] for r in rows) / len(rows), "n": len(rows),
            "length": max(len(p.ids) for p in prompts), "rows": rows}


def passkey_accuracy_vllm(ckpt: str | Path, tok, prompts: list[PasskeyPrompt], work: Path,
                          max_new: int = 8) -> dict:
    """:func:`passkey_accuracy` through the vLLM engine (greedy, prefix caching on: the shared
    filler prefix is computed once). Same scoring."""
    from model_patches.evaluation import vllm_check as evaluate_vllm
    longest = max(prompts, key=lambda p: p.prefix_len)
    out = evaluate_vllm.run(ckpt, None, work, spec_extra={
        "mode": "generate", "prompts": [p.ids for p in prompts], "max_tokens": max_new,
        "prefix": longest.ids[: longest.prefix_len]})
    rows = []
    for p, gen in zip(prompts, out["tokens"]):
        text = tok.decode(gen, skip_special_tokens=True)
        rows.append({"answer": p.answer, "output": text, "depth": p.needle_start / len(p.ids),
                     "correct": extract_passkey(text) == p.answer})
    return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "n": len(rows),
            "length": max(len(p.ids) for p in prompts), "rows": rows, "engine": "vllm",
            "engine_seconds": out["seconds"], "startup_s": out["startup_s"]}


# ---------------------------------------------------------------------------- chat
CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Write a haiku about the sea.",
    "Explain in two sentences what a CPU does.",
    "What is 12 plus 30?",
)


def chat_ids(tok, prompt: str) -> list[int]:
    """The prompt as a one-turn chat (the tokenizer's template, generation prompt added)."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                  add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


def stop_ids(tok) -> set[int]:
    """End-of-sequence and end-of-turn token ids."""
    return {t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if t is not None}


@torch.no_grad()
def greedy_chat(model: TorchCausalLM, tok, prompts=CHAT_PROMPTS, max_new: int = 48) -> list[dict]:
    stop = stop_ids(tok)
    return [{"prompt": q, "answer": tok.decode(greedy(model, chat_ids(tok, q), max_new, stop=stop),
                                               skip_special_tokens=True).strip()}
            for q in prompts]
