"""Quality of L2-norm KV eviction on the default model (`make bench-eviction-quality`).

    python -m model_patches.evaluation.eviction_quality [--keeps 0.5,0.25,0.1] [--sink 4] [--window 64]
        [--extra keep=0.5,skip=2] [--extra keep=0.5,order=random] [--extra-tasks ppl,niah2048]

Eviction (engine/eviction/policy.py, the same as the engine and engine.reference): a prompt of
L tokens is prefilled with full causal attention; then per layer and KV head only the keys
``policy.select(‖k‖₂)`` (and their values) stay in the cache; later tokens attend to those
plus every token after the prompt, at their logical RoPE positions. Here the cache is compacted
literally (:func:`evict_cache`) and later tokens run on it (``ThinLM`` with ``pos0``);
tests/test_eviction_reference.py checks this against ``engine.reference`` and transformers.

Metrics (plain batched torch, float32), written between the quality markers of
docs/results/eviction.md:

* **perplexity**, sliding windows of 2048 held-out Wikipedia tokens (model_patches.evaluation.text_sets,
  evaluation split) at stride 1024: the first 1024 tokens are the evicted prompt, the last 1024
  are scored teacher-forced on the evicted cache (the first of them is predicted by the
  prompt's last row, which eviction cannot change);
* **needle in a haystack** at 2k / 4k tokens: real held-out text, a fact sentence
  (" <name>'s favourite <thing> is <value>.") at a random sentence boundary, a question at the
  end, greedy answer, exact match of the value;
* **passkey** at 2k / 4k (model_patches.evaluation.tasks.passkey_prompts, extract_passkey).

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
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.eviction.policy import DEFAULT_SINK, DEFAULT_WINDOW, EvictionPolicy
from model_patches.evaluation.tasks import ThinLM, token_nll

BEGIN, END = "<!-- quality:begin -->", "<!-- quality:end -->"
REPORT = Path(__file__).resolve().parent.parent / "docs" / "results" / "eviction.md"
PLOT = "eviction-quality.png"


# ---------------------------------------------------------------------------- eviction math
def evict_cache(cache: list, policy: EvictionPolicy, skip_layers: int = 0,
                order: str = "low") -> list:
    """Compact a KV cache (per layer (k [B, H_kv, L, r], v [B, H_kv, L, D]), k after RoPE) to
    the positions ``policy.select(‖k‖₂)`` of each sequence, layer and KV head, in order. Every
    head keeps the same count, so the result is again a dense cache [B, H_kv, kept, ·].
    Variations (not engine options), as controls: ``skip_layers``: the first N layers keep
    everything; ``order``: 'low' (the policy: lowest norms kept), 'high' (highest norms kept),
    'random' (uniform scores, seeded per layer: deterministic)."""
    out = []
    for i, (k, v) in enumerate(cache):
        if i < skip_layers:
            out.append((k, v))
            continue
        scores = k.float().norm(dim=-1)                                       # [B, H_kv, L]
        if order == "high":
            scores = -scores
        elif order == "random":
            scores = torch.rand(scores.shape, generator=torch.Generator().manual_seed(i))
        elif order != "low":
            raise ValueError(f"order must be low, high or random, got {order!r}")
        sel = torch.stack([policy.select(sb) for sb in scores])             # [B, H_kv, kept]
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


@dataclass(frozen=True)
class Setting:
    """One eviction setting of the benchmark: a policy, plus variations the engine does not
    implement (controls): ``skip_layers`` (the first N layers keep their whole cache) and
    ``order`` ('low' = the policy, 'random', 'high'; see evict_cache)."""
    policy: EvictionPolicy
    skip_layers: int = 0
    order: str = "low"

    @property
    def key(self) -> str:
        """Result key, e.g. 'keep0.5-s4-w64', 'keep0.5-s4-w64-skip2', 'keep0.5-s4-w64-random'."""
        p = self.policy
        return f"keep{p.keep:g}-s{p.sink}-w{p.window}" + \
            (f"-skip{self.skip_layers}" if self.skip_layers else "") + \
            (f"-{self.order}" if self.order != "low" else "")

    def label(self, sink: int, window: int) -> str:
        p, extra = self.policy, []
        if (p.sink, p.window) != (sink, window):
            extra.append(f"sink {p.sink}, window {p.window}")
        if self.skip_layers:
            extra.append(f"layers 0-{self.skip_layers - 1} not evicted")
        if self.order != "low":
            extra.append({"random": "control: random tokens kept instead of lowest-norm",
                          "high": "control: highest-norm tokens kept"}[self.order])
        return f"keep {p.keep:g}" + (f" ({'; '.join(extra)})" if extra else "")

    def kept_fraction(self, n: int, n_layers: int) -> float:
        """Fraction of an n-token prompt's KV (all layers) that stays."""
        k = self.policy.num_kept(n)
        return (self.skip_layers * n + (n_layers - self.skip_layers) * k) / (n_layers * n)

    def evict(self, cache: list) -> list:
        if not self.policy.enabled:
            return cache
        return evict_cache(cache, self.policy, self.skip_layers, self.order)

    @classmethod
    def parse(cls, spec: str) -> "Setting":
        """'keep=F[,sink=S][,window=W][,skip=N][,order=low|random|high]'."""
        parts = [x.strip() for x in spec.split(",") if x.strip()]
        mine = {x.split("=", 1)[0]: x.split("=", 1)[1].strip() for x in parts
                if x.startswith(("skip=", "order="))}
        order = mine.get("order", "low")
        if order not in ("low", "random", "high"):
            raise ValueError(f"order must be low, random or high, got {order!r}")
        policy = EvictionPolicy.parse(",".join(x for x in parts
                                               if not x.startswith(("skip=", "order="))))
        return cls(policy, int(mine.get("skip", 0)), order)

    def to_dict(self) -> dict:
        return {**self.policy.to_dict(), "skip_layers": self.skip_layers, "order": self.order}

    @classmethod
    def from_dict(cls, d: dict) -> "Setting":
        d = dict(d)
        skip, order = d.pop("skip_layers", 0), d.pop("order", "low")
        return cls(EvictionPolicy(**d), skip, order)


def _key(setting: Setting | None) -> str:
    return "none" if setting is None else setting.key


# ---------------------------------------------------------------------------- perplexity
def ppl_windows(stream: list[int], n: int, ctx: int = 2048, stride: int = 1024) -> torch.Tensor:
    """n windows [n, ctx] of the stream starting every ``stride`` tokens."""
    need = (n - 1) * stride + ctx
    if len(stream) < need:
        raise ValueError(f"evaluation text has {len(stream)} tokens, {need} needed")
    ids = torch.as_tensor(stream[:need], dtype=torch.long)
    return torch.stack([ids[i * stride:i * stride + ctx] for i in range(n)])


@torch.no_grad()
def window_evicted_nll(model: ThinLM, window: torch.Tensor, prompt_len: int,
                       settings: list[Setting | None]) -> dict[str, float]:
    """Σ NLL of window[prompt_len:] per setting (None: no eviction): one prefill of the prompt,
    then the rest teacher-forced on the (evicted) cache. The first scored token is predicted by
    the prompt's last row (identical for every setting)."""
    cache: list = []
    last = model.hidden_states(window[None, :prompt_len], cache)[0, -1:]
    first = token_nll(model, last, window[prompt_len:prompt_len + 1])
    out = {}
    for setting in settings:
        c = cache if setting is None else setting.evict(cache)
        hs, _ = run_on_cache(model, c, window[prompt_len:-1], prompt_len)
        nll = torch.cat([first, token_nll(model, hs, window[prompt_len + 1:])])
        out[_key(setting)] = nll.double().sum().item()
    return out


# ---------------------------------------------------------------------------- retrieval prompts
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


def _enc(tok, text: str) -> list[int]:
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
        needle = _enc(tok, NIAH_NEEDLE.format(name=name, thing=thing, value=value))
        question = _enc(tok, NIAH_QUESTION.format(name=name, thing=thing))
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
    from model_patches.evaluation.tasks import PASSKEY_QUESTION, passkey_prompts
    q = len(_enc(tok, PASSKEY_QUESTION))
    return [{"ids": p.ids, "answer": p.answer, "haystack": 0, "depth": p.prefix_len,
             "question_len": q} for p in passkey_prompts(tok, length, n, seed)]


@torch.no_grad()
def retrieval_outputs(model: ThinLM, item: dict, shared: list, settings: list[Setting],
                      max_new: int, stop: set[int], want: set[str]) -> dict[str, list[int]]:
    """Greedy answer tokens of one prompt, keyed 'none', 'context/<setting>', 'engine/<setting>'
    (only the keys in ``want`` are computed). ``shared``: the KV cache of a prefix of the
    prompt's haystack that covers ids[:depth] (cropped here). context: the prompt without the
    question is evicted, the question runs on the evicted cache; engine: the whole prompt is
    evicted after its prefill (the first answer token comes from the prefill)."""
    ids, q = item["ids"], item["question_len"]
    n_ctx, d = len(ids) - q, item["depth"]
    cache = [(k[:, :, :d], v[:, :, :d]) for k, v in shared]
    _, cache = run_on_cache(model, cache, ids[d:n_ctx], d)           # the context's full cache
    hs, full = run_on_cache(model, cache, ids[n_ctx:], n_ctx)        # + question, no eviction
    first = int(model.logits(hs[-1]).argmax())
    out = {}
    if "none" in want:
        out["none"] = greedy_on_cache(model, full, len(ids), first, max_new, stop)
    for st in settings:
        key = f"context/{st.key}"
        if key in want:
            hs, ev = run_on_cache(model, st.evict(cache), ids[n_ctx:], n_ctx)
            out[key] = greedy_on_cache(model, ev, len(ids), int(model.logits(hs[-1]).argmax()),
                                       max_new, stop)
        key = f"engine/{st.key}"
        if key in want:
            out[key] = greedy_on_cache(model, st.evict(full), len(ids), first, max_new, stop)
    return out


# ---------------------------------------------------------------------------- driver
def _add_seconds(res, key: str, seconds: float) -> None:
    """Accumulate compute time under ``key`` and save every pending result (atomic write)."""
    res.put(key, (res.get(key) or 0.0) + seconds)


def _settings(opts: dict) -> tuple[list[Setting], list[Setting]]:
    """(main settings: --keeps at --sink/--window, extra settings: --extra)."""
    main = [Setting(EvictionPolicy(keep=k, sink=opts["sink"], window=opts["window"]))
            for k in opts["keeps"]]
    extra = [s for s in dict.fromkeys(Setting.parse(x) for x in opts["extra"]) if s not in main]
    return main, extra


def compute(opts: dict, log=print) -> dict:
    """Compute (or read from the cache) every metric; returns the summary for the report."""
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from model_patches.evaluation.quality import Results
    from model_patches.evaluation.text_sets import token_stream

    ckpt = Path(opts["model"])
    res = Results(Path(opts["work"]), "eviction", ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    stream = token_stream(tok, "evaluation")
    main, extra = _settings(opts)
    model = ThinLM.from_dir(ckpt).eval()
    summary: dict = {"settings": [s.to_dict() for s in main + extra], "n_layers": model.n_layers,
                     "ppl": {}, "retrieval": []}

    def wanted(task: str) -> list[Setting]:        # --extra settings only where asked
        tasks = opts["extra_tasks"]
        return main + (extra if tasks == ["all"] or task in tasks else [])
    bar_opts = dict(disable=not opts["progress"], dynamic_ncols=True)

    # perplexity: per window, the missing settings only
    ctx, half = opts["ppl_ctx"], opts["ppl_ctx"] // 2
    windows = ppl_windows(stream, opts["ppl_windows"], ctx, half)
    settings = [None] + wanted("ppl")
    for i in tqdm(range(len(windows)), desc=f"perplexity ctx {ctx}", unit="window", **bar_opts):
        key = f"ppl/ctx{ctx}/stride{half}/w{i}/"
        missing = [p for p in settings if res.get(key + _key(p)) is None]
        if missing:
            t0 = time.time()
            for s, v in window_evicted_nll(model, windows[i], half, missing).items():
                res.metrics[key + s] = v
            _add_seconds(res, f"ppl/ctx{ctx}/seconds", time.time() - t0)
    for p in settings:
        nll = sum(res.get(f"ppl/ctx{ctx}/stride{half}/w{i}/{_key(p)}")
                  for i in range(len(windows)))
        summary["ppl"][_key(p)] = math.exp(nll / (len(windows) * (ctx - half)))
    summary["ppl_meta"] = {"windows": len(windows), "ctx": ctx, "prompt": half,
                           "scored": len(windows) * (ctx - half),
                           "seconds": res.get(f"ppl/ctx{ctx}/seconds") or 0.0}

    # retrieval
    stop = {t for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")) if t is not None}
    stop |= {i for i in _enc(tok, "\n")}
    tasks = []
    for length in opts["lengths"]:
        if opts["niah_n"]:
            tasks.append(("niah", length, niah_prompts(tok, stream, length, opts["niah_n"],
                                                       opts["seed"]), 6, niah_correct))
        if opts["passkey_n"]:
            from model_patches.evaluation.tasks import extract_passkey
            tasks.append(("passkey", length, passkey_items(tok, length, opts["passkey_n"],
                                                           opts["seed"]), 8,
                          lambda text, ans: extract_passkey(text) == ans))
    for name, length, items, max_new, correct in tasks:
        settings = wanted(f"{name}{length}")
        keys = ["none"] + [f"{m}/{p.key}" for p in settings for m in ("context", "engine")]
        base = f"{name}/len{length}/seed{opts['seed']}"      # items are prefix-stable in n

        def ikey(j: int, it: dict, k: str) -> str:
            return f"{base}/i{j}-d{it['depth']}-{it['answer']}/{k}"

        shared, shared_h = None, None
        for j, item in enumerate(tqdm(items, desc=f"{name} {length}", unit="prompt", **bar_opts)):
            want = {k for k in keys if res.get(ikey(j, item, k)) is None}
            if not want:
                continue
            t0 = time.time()
            if shared_h != item["haystack"]:
                group = [it for it in items if it["haystack"] == item["haystack"]]
                longest = max(group, key=lambda it: it["depth"])
                assert all(it["ids"][:it["depth"]] == longest["ids"][:it["depth"]] for it in group)
                shared, shared_h = [], item["haystack"]
                with torch.no_grad():
                    model.hidden_states(torch.tensor([longest["ids"][:longest["depth"]]]), shared)
            outs = retrieval_outputs(model, item, shared, settings, max_new, stop, want)
            for k, toks in outs.items():
                res.metrics[ikey(j, item, k)] = tok.decode(toks, skip_special_tokens=True)
            _add_seconds(res, f"{base}/seconds", time.time() - t0)
        row = {"task": name, "length": length, "n": len(items), "acc": {},
               "seconds": res.get(f"{base}/seconds") or 0.0}
        ok = {k: [correct(res.get(ikey(j, it, k)), it["answer"]) for j, it in enumerate(items)]
              for k in keys}
        row["acc"] = {k: sum(v) / len(items) for k, v in ok.items()}
        row["flips"] = {k: [sum(a and not b for a, b in zip(ok["none"], v)),      # lost, gained
                            sum(b and not a for a, b in zip(ok["none"], v))] for k, v in ok.items()}
        row["examples"] = [{"answer": it["answer"], **{k: res.get(ikey(j, it, k)) for k in keys[:3]}}
                           for j, it in enumerate(items[:3])]
        summary["retrieval"].append(row)
        log(f"[eviction] {name} {length}: " + ", ".join(f"{k} {v:.0%}" for k, v in row["acc"].items()))
    return summary


# ---------------------------------------------------------------------------- report
TASK_NAMES = {"niah": "needle in a haystack", "passkey": "passkey"}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def _pts(x: float | None, base: float, flips: list[int] | None = None) -> str:
    if x is None:
        return "–"
    return f"{100 * (x - base):+.0f}" + (f" (−{flips[0]}/+{flips[1]})" if flips else "")


def targets(summary: dict, sink: int, window: int) -> list[str]:
    """The issue's targets, checked on the default-policy rows (both retrieval modes)."""
    lines = []
    ppl = summary["ppl"]
    s05 = Setting(EvictionPolicy(0.5, sink, window)).key
    if s05 in ppl:
        rel = ppl[s05] / ppl["none"] - 1
        lines.append(f"- perplexity, keep 0.5 within +1%: {rel:+.2%} — "
                     f"{'met' if rel <= 0.01 else 'missed'}")
    for task, keep in (("niah", 0.5), ("passkey", 0.1)):
        s = Setting(EvictionPolicy(keep, sink, window)).key
        for row in summary["retrieval"]:
            if row["task"] != task or f"context/{s}" not in row["acc"]:
                continue
            base = row["acc"]["none"]
            parts = []
            for mode in ("context", "engine"):
                d = 100 * (row["acc"][f"{mode}/{s}"] - base)
                parts.append(f"{mode} mode {d:+.0f} points ({'met' if d >= -2 else 'missed'})")
            lines.append(f"- {TASK_NAMES[task]} {row['length']}, keep {keep:g} within 2 points "
                         f"(n = {row['n']}): " + "; ".join(parts))
    main = sorted((Setting.from_dict(d) for d in summary["settings"]), key=lambda s: s.policy.keep)
    main = [s for s in main
            if s.skip_layers == 0 and s.order == "low"
            and (s.policy.sink, s.policy.window) == (sink, window)]
    for row in summary["retrieval"]:
        low = []
        for mode in ("context", "engine"):
            ok = [s.policy.keep for s in main
                  if row["acc"].get(f"{mode}/{s.key}", -1) >= row["acc"]["none"] - 0.02]
            low.append(f"{mode} mode {min(ok):g}" if ok else f"{mode} mode none of "
                       f"{', '.join(f'{s.policy.keep:g}' for s in main)}")
        lines.append(f"- {TASK_NAMES[row['task']]} {row['length']}: smallest keep within 2 "
                     "points: " + "; ".join(low))
    return lines


def variations(summary: dict, settings: list[Setting], sink: int, window: int) -> list[str]:
    """One line per --extra setting: its numbers next to the main policy's at the same keep."""
    lines = []
    for st in settings:
        ref = Setting(EvictionPolicy(st.policy.keep, sink, window))
        if st == ref or ref not in settings:
            continue
        ppl, parts = summary["ppl"], []
        if st.key in ppl:
            parts.append(f"perplexity {ppl[st.key] / ppl['none'] - 1:+.2%} (policy "
                         f"{ppl[ref.key] / ppl['none'] - 1:+.2%})")
        for row in summary["retrieval"]:
            got = [row["acc"].get(f"{m}/{st.key}") for m in ("context", "engine")]
            if None in got:
                continue
            want = [row["acc"][f"{m}/{ref.key}"] for m in ("context", "engine")]
            parts.append(f"{row['task']} {row['length']} context {_pct(got[0])} (policy "
                         f"{_pct(want[0])}), engine {_pct(got[1])} (policy {_pct(want[1])})")
        lines.append(f"- {st.label(sink, window)}: " + "; ".join(parts))
    return lines


def plot(path: Path, summary: dict, settings: list[Setting], opts: dict) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    main = sorted((s for s in settings if s.skip_layers == 0 and s.order == "low" and
                   (s.policy.sink, s.policy.window) == (opts["sink"], opts["window"])),
                  key=lambda s: -s.policy.keep)
    xs = [1.0] + [s.policy.keep for s in main]
    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    ppl = summary["ppl"]
    ax[0].plot(xs, [0.0] + [100 * (ppl[s.key] / ppl["none"] - 1) for s in main], "o-")
    ax[0].axhline(1.0, color="gray", ls=":", label="target at keep 0.5: +1%")
    ax[0].set(xlabel="fraction of prompt KV kept", ylabel="perplexity change (%)",
              title=f"Perplexity, {summary['ppl_meta']['prompt']}-token evicted prompt")
    ax[0].invert_xaxis()
    ax[0].legend()
    for n, row in enumerate(summary["retrieval"]):
        for mode, ls in (("context", "-"), ("engine", "--")):
            ys = [row["acc"]["none"]] + [row["acc"][f"{mode}/{s.key}"] for s in main]
            ax[1].plot(xs, [100 * y for y in ys], "o" + ls, color=f"C{n}",
                       label=f"{row['task']} {row['length']} ({mode})")
    ax[1].set(xlabel="fraction of prompt KV kept", ylabel="exact match (%)", ylim=(-5, 105),
              title="Retrieval (greedy)")
    ax[1].invert_xaxis()
    ax[1].legend(fontsize=7)
    fig.suptitle(f"L2-norm eviction, SmolLM2-135M-Instruct (sink {opts['sink']}, "
                 f"window {opts['window']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_section(summary: dict, opts: dict, command: str, plot_name: str | None,
                   minutes: float) -> str:
    settings = [Setting.from_dict(d) for d in summary["settings"]]
    sink, window, n_layers = opts["sink"], opts["window"], summary["n_layers"]
    meta = summary["ppl_meta"]
    ppl = summary["ppl"]
    out = [BEGIN, "## Quality: perplexity and retrieval (plain torch, default model)", "",
           f"Command: `{command}` (`make bench-eviction-quality`)", "",
           f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} shared CPU cores "
           f"({platform.machine()}), {minutes:.0f} min of compute in the run(s) that filled the "
           "cache. SmolLM2-135M-Instruct (30 layers, 3 KV heads, head_dim 64), float32, "
           "`model_patches/evaluation/eviction_quality.py`: the prompt is prefilled with full attention, "
           "then its KV cache is compacted per layer and KV head to `EvictionPolicy.select` "
           "(the lowest-‖k‖₂ middle tokens plus the first `sink` and last `window`), and later "
           "tokens run on the compacted cache at their logical positions — the engine's "
           "semantics, checked against `engine.reference` and transformers in "
           f"`tests/test_eviction_reference.py`. Policy: sink {sink}, window {window}.", "",
           "### Perplexity", "",
           f"Held-out Wikipedia text (`wiki_data.token_stream(tok, 'evaluation')`), "
           f"{meta['windows']} sliding windows of {meta['ctx']} tokens at stride {meta['prompt']}: "
           f"the first {meta['prompt']} tokens of a window are the evicted prompt, the last "
           f"{meta['ctx'] - meta['prompt']} are scored teacher-forced on the evicted cache "
           f"({meta['scored']:,} scored tokens).", "",
           "| setting | prompt KV kept | PPL | Δ vs no eviction |", "|---|---:|---:|---:|",
           f"| no eviction | 100% | {ppl['none']:.3f} | – |"]
    for st in settings:
        if st.key in ppl:
            out.append(f"| {st.label(sink, window)} | "
                       f"{st.kept_fraction(meta['prompt'], n_layers):.1%} | {ppl[st.key]:.3f} | "
                       f"{ppl[st.key] / ppl['none'] - 1:+.2%} |")
    out += ["", "### Retrieval", "",
            "Greedy answers, exact match. *Needle in a haystack*: a held-out Wikipedia "
            "haystack (one per 10 prompts), the fact `<name>'s favourite <thing> is <value>.` "
            "(16 names, 6 things, 6 values each) after a random sentence end, then `Question: "
            "What is <name>'s favourite <thing>?\\nAnswer: <name>'s favourite <thing> is`; "
            "correct when the first word of the answer is the value. *Passkey*: "
            "`model_patches.evaluation.tasks.passkey_prompts` (repeated filler, 5-digit key at a random "
            "depth), `extract_passkey`.", "",
            "Two modes. **context**: the evicted prompt is everything before the question; the "
            "question is fed afterwards on the evicted cache, so every answer token depends on "
            "what was kept (the stricter test; the kvpress / paper setting). **engine**: the "
            "whole prompt, question included, is evicted after its prefill (what `factorkv "
            "serve --kv-evict` does to one request): the first answer token comes from the "
            "prefill, only the following ones see the evicted cache. Δ: accuracy change in "
            "points (prompts lost / gained against no eviction, same prompts); one prompt is "
            f"{100 / max((r['n'] for r in summary['retrieval']), default=1):.0f} points, so a "
            "2-point target is at the resolution of the sample.", "",
            "| task | length | n | setting | prompt KV kept | context mode | Δ (points) | "
            "engine mode | Δ (points) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for row in summary["retrieval"]:
        b = row["acc"]["none"]
        out.append(f"| {TASK_NAMES[row['task']]} | {row['length']} | {row['n']} | no eviction | "
                   f"100% | {_pct(b)} | – | {_pct(b)} | – |")
        for st in settings:
            kc, ke = f"context/{st.key}", f"engine/{st.key}"
            c, e = row["acc"].get(kc), row["acc"].get(ke)
            if c is None and e is None:
                continue
            out.append(f"| | | | {st.label(sink, window)} | "
                       f"≈{st.kept_fraction(row['length'], n_layers):.0%} | "
                       f"{_pct(c)} | {_pts(c, b, row['flips'].get(kc))} | "
                       f"{_pct(e)} | {_pts(e, b, row['flips'].get(ke))} |")
    out += ["", "### Targets (issue 9)", ""] + targets(summary, sink, window)
    var = variations(summary, settings, sink, window)
    if var:
        out += ["", "### Variations and controls (keep fixed, against the policy)", "",
                "Not engine options: measured to see whether the policy's choices matter here.",
                ""] + var
    if plot_name:
        out += ["", f"![eviction quality]({plot_name})"]
    out += ["", "Per-item results are cached in `~/.cache/factorkv/eviction/results/eviction.json` "
            "(keyed by task, item, setting and the checkpoint's fingerprint); a re-run only "
            "computes what is missing and rewrites this section.", END]
    return "\n".join(out)


def write_report(path: Path, section: str) -> None:
    """Replace the text between the quality markers of ``path`` (create the file if needed)."""
    text = path.read_text() if path.exists() else \
        "# L2-norm KV eviction: results\n\n" + BEGIN + "\n" + END + "\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    from model_patches.conversion.default_model import cache_root, default_model_dir
    ap = argparse.ArgumentParser(prog="python -m model_patches.evaluation.eviction_quality",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(default_model_dir()), help="checkpoint (default: the "
                    "prepared default model)")
    ap.add_argument("--keeps", type=_floats, default=[0.5, 0.25, 0.1])
    ap.add_argument("--sink", type=int, default=DEFAULT_SINK)
    ap.add_argument("--window", type=int, default=DEFAULT_WINDOW)
    ap.add_argument("--extra", action="append", default=[],
                    metavar="keep=F[,sink=S,window=W,skip=N,order=O]",
                    help="an extra setting row (repeatable), e.g. another window; variations the "
                    "engine does not have: skip=N (the first N layers are not evicted), "
                    "order=random|high (controls: random or highest-norm tokens kept)")
    ap.add_argument("--extra-tasks", type=lambda x: x.split(","), default=["all"],
                    help="where --extra settings are computed: all, or a list of ppl, niah2048, "
                    "passkey4096, ...")
    ap.add_argument("--ppl-windows", type=int, default=24)
    ap.add_argument("--ppl-ctx", type=int, default=2048)
    ap.add_argument("--lengths", type=_ints, default=[2048, 4096])
    ap.add_argument("--niah-n", type=int, default=50)
    ap.add_argument("--passkey-n", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default=str(cache_root() / "eviction"))
    ap.add_argument("--out", default=str(REPORT))
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: the cores "
                    "not busy by the 1-min load average, at least 1; oversubscribed threads on a "
                    "shared machine are several times slower)")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    torch.set_num_threads(a.threads or max(1, cores - int(os.getloadavg()[0] + 0.5)))
    opts = dict(vars(a), progress=not a.no_progress)
    command = "python -m model_patches.evaluation.eviction_quality " + shlex.join(
        argv if argv is not None else sys.argv[1:])
    t0 = time.time()
    summary = compute(opts)
    out = Path(a.out)
    settings = [Setting.from_dict(d) for d in summary["settings"]]
    png = plot(out.parent / PLOT, summary, settings, opts)
    minutes = (summary["ppl_meta"]["seconds"] + sum(r["seconds"] for r in summary["retrieval"])) / 60
    write_report(out, report_section(summary, opts, command.strip(), png and png.name, minutes))
    (Path(a.work) / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[eviction] wrote {out} in {time.time() - t0:.0f} s ({torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
