"""The benchmark's compute loop: prefill, evict per setting, run the rest on the evicted cache.

Every per-item result (a window's NLL, a prompt's greedy answer) goes into a result cache
(``Results``: ``<work>/results/eviction.json``, keyed by task, item, setting and the
checkpoint's fingerprint), so an interrupted or repeated run only computes what is missing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from tqdm import tqdm

from engine.eviction.policy import L2NormPolicy
from engine.torch_model import TorchCausalLM, crop_cache
from model_patches.evaluation.eviction_quality.settings import Setting
from model_patches.evaluation.eviction_quality.tasks import (RetrievalTask, ppl_windows,
                                                             retrieval_tasks, stop_tokens)
from model_patches.evaluation.results_cache import Results
from model_patches.evaluation.tasks import token_nll
from model_patches.text_sets import token_stream


def setting_key(setting: Setting | None) -> str:
    """Result key of a setting; None (no eviction) is 'none'."""
    return "none" if setting is None else setting.key


@torch.no_grad()
def run_on_cache(model: TorchCausalLM, cache: list, ids: list[int] | torch.Tensor, pos0: int
                 ) -> tuple[torch.Tensor, list]:
    """Teacher-force ids [T] at logical positions pos0.. on a (possibly evicted) cache; returns
    (hidden states [T, hidden], the extended cache). ``cache`` itself is not modified."""
    ext = list(cache)
    hs = model.hidden_states(torch.as_tensor(ids, dtype=torch.long)[None], ext, pos0=pos0)
    return hs[0], ext


@torch.no_grad()
def greedy_on_cache(model: TorchCausalLM, cache: list, pos0: int, first: int, max_new: int,
                    stop: set[int] = frozenset()) -> list[int]:
    """Greedy tokens after ``first`` (already chosen, at position pos0): feeds one token at a
    time on the cache; returns [first, ...] (at most max_new tokens)."""
    out, ext = [first], list(cache)
    while len(out) < max_new and out[-1] not in stop:
        hs = model.hidden_states(torch.tensor([[out[-1]]]), ext, pos0=pos0 + len(out) - 1)
        out.append(int(model.logits(hs[0, -1]).argmax()))
    return out


@torch.no_grad()
def window_evicted_nll(model: TorchCausalLM, window: torch.Tensor, prompt_len: int,
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
        out[setting_key(setting)] = nll.double().sum().item()
    return out


@torch.no_grad()
def retrieval_outputs(model: TorchCausalLM, item: dict, shared: list, settings: list[Setting],
                      max_new: int, stop: set[int], want: set[str]) -> dict[str, list[int]]:
    """Greedy answer tokens of one prompt, keyed 'none', 'context/<setting>', 'engine/<setting>'
    (only the keys in ``want`` are computed). ``shared``: the KV cache of a prefix of the
    prompt's haystack that covers ids[:depth] (cropped here). context: the prompt without the
    question is evicted, the question runs on the evicted cache; engine: the whole prompt is
    evicted after its prefill (the first answer token comes from the prefill)."""
    ids, q = item["ids"], item["question_len"]
    n_ctx, d = len(ids) - q, item["depth"]
    cache = crop_cache(shared, d)
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


def settings_of(opts: dict) -> tuple[list[Setting], list[Setting]]:
    """(main settings: --keeps at --sink/--window, extra settings: --extra)."""
    main = [Setting(L2NormPolicy(keep=k, sink=opts["sink"], window=opts["window"]))
            for k in opts["keeps"]]
    extra = [s for s in dict.fromkeys(Setting.parse(x) for x in opts["extra"]) if s not in main]
    return main, extra


def compute(opts: dict, log=print) -> dict:
    """Compute (or read from the cache) every metric; returns the summary for the report."""
    from transformers import AutoTokenizer  # heavy: only when a run computes

    ckpt = Path(opts["model"])
    res = Results(Path(opts["work"]), "eviction", ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    stream = token_stream(tok, "evaluation")
    main, extra = settings_of(opts)
    model = TorchCausalLM.from_dir(ckpt).eval()
    summary: dict = {"settings": [s.to_dict() for s in main + extra], "n_layers": model.n_layers,
                     "ppl": {}, "retrieval": []}

    def wanted(task: str) -> list[Setting]:        # --extra settings only where asked
        tasks = opts["extra_tasks"]
        return main + (extra if tasks == ["all"] or task in tasks else [])
    bar_opts = dict(disable=not opts["progress"], dynamic_ncols=True)

    windows = ppl_windows(stream, opts["ppl_windows"], opts["ppl_ctx"], opts["ppl_ctx"] // 2)
    summary["ppl"], summary["ppl_meta"] = perplexity(model, res, windows, [None] + wanted("ppl"),
                                                     bar_opts)
    stop = stop_tokens(tok)
    for task in retrieval_tasks(tok, stream, opts["lengths"], opts["niah_n"], opts["passkey_n"],
                                opts["seed"]):
        row = retrieval(model, tok, res, task, wanted(f"{task.name}{task.length}"), opts["seed"],
                        stop, bar_opts)
        summary["retrieval"].append(row)
        log(f"[eviction] {task.name} {task.length}: "
            + ", ".join(f"{k} {v:.0%}" for k, v in row["acc"].items()))
    return summary


def perplexity(model: TorchCausalLM, res: Results, windows: torch.Tensor,
               settings: list[Setting | None], bar_opts: dict) -> tuple[dict[str, float], dict]:
    """Perplexity per setting key over the windows [n, ctx] (the first half of each is the
    evicted prompt), computing only the missing (window, setting) results; and the meta row."""
    ctx = windows.shape[1]
    half = ctx // 2
    for i in tqdm(range(len(windows)), desc=f"perplexity ctx {ctx}", unit="window", **bar_opts):
        key = f"ppl/ctx{ctx}/stride{half}/w{i}/"
        missing = [p for p in settings if res.get(key + setting_key(p)) is None]
        if missing:
            t0 = time.time()
            for s, v in window_evicted_nll(model, windows[i], half, missing).items():
                res.metrics[key + s] = v
            _add_seconds(res, f"ppl/ctx{ctx}/seconds", time.time() - t0)
    ppl = {}
    for p in settings:
        nll = sum(res.get(f"ppl/ctx{ctx}/stride{half}/w{i}/{setting_key(p)}")
                  for i in range(len(windows)))
        ppl[setting_key(p)] = math.exp(nll / (len(windows) * (ctx - half)))
    meta = {"windows": len(windows), "ctx": ctx, "prompt": half,
            "scored": len(windows) * (ctx - half),
            "seconds": res.get(f"ppl/ctx{ctx}/seconds") or 0.0}
    return ppl, meta


def retrieval(model: TorchCausalLM, tok, res: Results, task: RetrievalTask,
              settings: list[Setting], seed: int, stop: set[int], bar_opts: dict) -> dict:
    """One retrieval task's summary row (accuracy, flips against no eviction, examples),
    computing only the missing (prompt, mode/setting) answers. Prompts that share a haystack
    share one prefill of its longest common prefix."""
    name, length, items = task.name, task.length, task.items
    keys = ["none"] + [f"{m}/{p.key}" for p in settings for m in ("context", "engine")]
    base = f"{name}/len{length}/seed{seed}"      # items are prefix-stable in n

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
        outs = retrieval_outputs(model, item, shared, settings, task.max_new, stop, want)
        for k, toks in outs.items():
            res.metrics[ikey(j, item, k)] = tok.decode(toks, skip_special_tokens=True)
        _add_seconds(res, f"{base}/seconds", time.time() - t0)
    row = {"task": name, "length": length, "n": len(items), "acc": {},
           "seconds": res.get(f"{base}/seconds") or 0.0}
    ok = {k: [task.correct(res.get(ikey(j, it, k)), it["answer"]) for j, it in enumerate(items)]
          for k in keys}
    row["acc"] = {k: sum(v) / len(items) for k, v in ok.items()}
    row["flips"] = {k: [sum(a and not b for a, b in zip(ok["none"], v)),      # lost, gained
                        sum(b and not a for a, b in zip(ok["none"], v))] for k, v in ok.items()}
    row["examples"] = [{"answer": it["answer"], **{k: res.get(ikey(j, it, k)) for k in keys[:3]}}
                       for j, it in enumerate(items[:3])]
    return row
