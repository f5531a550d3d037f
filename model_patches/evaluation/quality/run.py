"""The benchmark's run: each variant's metrics, computed once and cached, then the report.

:func:`evaluate_variant` computes what the variant's result cache
(model_patches.evaluation.results_cache.Results, ``<work>/results/<variant>.json``) lacks:
perplexity on each held-out text (``opts["texts"]``: wiki, news) at each context, passkey
accuracy (greedy, through vLLM or torch; teacher-forced retrieval and the key's NLL, torch),
greedy chat answers, chat fidelity on the 48-prompt chat set against the original's
answers (model_patches.evaluation.chat_fidelity) and, for one variant, the perplexity
(Wikipedia) recomputed through the vLLM engine. :func:`run_benchmark`
builds the variants (variants.resolve_variant), evaluates them and writes the report.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import AutoTokenizer

from engine.torch_model import TorchCausalLM
from model_patches.conversion.default_model import cache_root, prepare_default_model
from model_patches.evaluation import chat_fidelity as C
from model_patches.evaluation import tasks as E
from model_patches.evaluation import vllm_check
from model_patches.evaluation.quality.report import write_report
from model_patches.evaluation.quality.report_chat import CHAT_REF_KEY, CHAT_SET_KEY
from model_patches.evaluation.quality.variants import (VARIANT_NAMES, parse_variant,
                                                       resolve_variant, variant_priority)
from model_patches.evaluation.results_cache import Results
from model_patches.evaluation.tasks import EvalError
from model_patches.text_sets import token_stream


def work_dir(path: str | None = None) -> Path:
    """The benchmark's work dir (models/, results/, vllm/): `path`, else <cache>/quality."""
    return Path(path) if path else cache_root() / "quality"


def evaluate_variant(name: str, ckpt: Path, root: Path, tok, opts: dict, log=print) -> dict:
    """Compute the missing metrics of one variant; returns its metrics dict."""
    res = Results(root, name, ckpt)
    model = None

    def get_model():
        nonlocal model
        if model is None:
            model = TorchCausalLM.from_dir(ckpt).eval()
        return model

    for text in opts.get("texts", tuple(E.PPL_TEXTS)):
        stream = token_stream(tok, E.PPL_TEXTS[text])
        for ctx in opts["contexts"]:
            key = E.ppl_key(text, ctx, opts["eval_tokens"])
            if res.get(key) is None:
                windows = E.eval_windows(stream, ctx, opts["eval_tokens"], f"the {text} text")
                t0 = time.time()
                with tqdm(total=len(windows), desc=f"{name} ppl {text} ctx {ctx}", unit="window",
                          disable=not opts["progress"]) as bar:
                    nll = E.window_nll(get_model(), windows, max(1, 2048 // ctx), bar).double()
                res.put(key, {"ppl": float(nll.mean().exp()), "tokens_scored": nll.numel(),
                              "windows": len(windows), "window_nll": nll.sum(1).tolist(),
                              "seconds": round(time.time() - t0, 1)})
            log(f"[eval] {name} {text} ctx {ctx}: PPL {res.get(key)['ppl']:.3f}")
    n_copy = opts.get("copy_n", 0)
    for text in opts.get("texts", tuple(E.PPL_TEXTS)) if n_copy else ():
        for length in opts["copy_lengths"]:
            key = E.copy_key(text, length, n_copy)
            if res.get(key) is None:
                windows = E.copy_windows(token_stream(tok, E.PPL_TEXTS[text]), length, n_copy,
                                         name=f"the {text} text")
                t0 = time.time()
                res.put(key, {**E.copy_recall(get_model(), windows),
                              "seconds": round(time.time() - t0, 1)})
            m = res.get(key)
            log(f"[eval] {name} copy {text} @{length}: NLL {m['nll']:.3f}, top-1 {m['top1']:.1%}")
    n_pk = opts["passkey_n"].get(name, 0)
    for length in opts["passkey_lengths"] if n_pk else ():
        key = E.passkey_key(length, n_pk, opts["seed"])
        if opts.get("passkey_engine", "vllm") != "vllm":
            key += "/torch"
        forced = E.passkey_key(length, n_pk, opts["seed"], forced=True)
        prompts = (E.passkey_prompts(tok, length, n_pk, opts["seed"])
                   if res.get(key) is None or res.get(forced) is None else None)
        if res.get(key) is None:
            t0 = time.time()
            if opts.get("passkey_engine", "vllm") == "vllm":
                log(f"[eval] {name}: {n_pk} passkey prompts of {length} tokens through vLLM")
                out = E.passkey_accuracy_vllm(ckpt, tok, prompts, root / "vllm" / name)
            else:
                with tqdm(total=n_pk, desc=f"{name} passkey {length}", unit="prompt",
                          disable=not opts["progress"]) as bar:
                    out = E.passkey_accuracy(get_model(), tok, prompts, progress=bar)
            out["seconds"] = round(time.time() - t0, 1)
            res.put(key, out)
        log(f"[eval] {name} passkey {length}: {res.get(key)['accuracy']:.2%} of {n_pk}")
        if res.get(forced) is None:       # the same prompts, the key teacher-forced (torch)
            t0 = time.time()
            with tqdm(total=n_pk, desc=f"{name} passkey {length} forced", unit="prompt",
                      disable=not opts["progress"]) as bar:
                out = E.passkey_forced(get_model(), tok, prompts, progress=bar)
            res.put(forced, {**out, "seconds": round(time.time() - t0, 1)})
        m = res.get(forced)
        log(f"[eval] {name} passkey {length} teacher-forced: {m['retrieved']:.2%} retrieved, "
            f"key NLL {m['key_nll']:.3f}")
    if name in opts["chat"] and res.get("chat/v1") is None:
        t0 = time.time()
        res.put("chat/v1", {"answers": E.greedy_chat(get_model(), tok),
                            "seconds": round(time.time() - t0, 1)})
    if name in opts["chat"]:
        _chat_set(name, res, get_model, tok, opts, log)
    if name == opts["vllm_variant"]:
        ctx = opts["vllm_ctx"]
        key = f"vllm-ppl/ctx{ctx}/tokens{opts['eval_tokens']}"
        if res.get(key) is None:
            windows = E.eval_windows(token_stream(tok, "evaluation"), ctx, opts["eval_tokens"])
            log(f"[eval] {name}: recomputing ctx {ctx} through vLLM ({windows.numel()} tokens)")
            t0 = time.time()
            out = vllm_check.run(ckpt, windows.tolist(), root / "vllm" / name)
            nll = torch.tensor(out["nll"], dtype=torch.float64)
            res.put(key, {"ppl": float(nll.mean().exp()), "tokens_scored": nll.numel(),
                          "window_nll": nll.sum(1).tolist(), "engine_seconds": out["seconds"],
                          "startup_s": out["startup_s"], "seconds": round(time.time() - t0, 1)})
        log(f"[eval] {name} vLLM ctx {ctx}: PPL {res.get(key)['ppl']:.3f}")
    return res.metrics


def _chat_set(name: str, res: Results, get_model, tok, opts: dict, log) -> None:
    """The original's answers (the reference, kept in its results) and every chat variant's
    fidelity to them."""
    if name == "original" and res.get(CHAT_REF_KEY) is None:
        res.put(CHAT_REF_KEY, C.reference_answers(get_model(), tok))
    reference = res.get(CHAT_REF_KEY) if name == "original" else opts.get("chat_reference")
    if reference is None:
        return
    digest = hashlib.sha256(json.dumps(reference).encode()).hexdigest()[:16]
    if (res.get(CHAT_SET_KEY) or {}).get("reference") == digest:   # scored against these
        return
    t0 = time.time()
    with tqdm(total=len(C.CHAT_SET), desc=f"{name} chat set", unit="prompt",
              disable=not opts["progress"]) as bar:
        out = C.chat_fidelity(get_model(), tok, reference, progress=bar)
    res.put(CHAT_SET_KEY, {**out, "reference": digest, "seconds": round(time.time() - t0, 1)})
    m = res.get(CHAT_SET_KEY)
    log(f"[eval] {name} chat set: answer NLL {m['nll']:.3f}, top-1 {m['top1']:.1%}, "
        f"same {m['same']:.0%}, loops {m['loops']:.0%}")


def run_benchmark(opts: dict, command: str, log=print) -> Path:
    """Build and evaluate every variant of `opts` (server/eval_cmd.py), write the report."""
    torch.set_num_threads(opts["threads"])
    t0 = time.time()
    root = work_dir(opts.get("work"))
    src = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(str(src))
    extra = {k: Path(v) for k, v in opts["extra"].items()}
    variants = list(opts["variants"]) + [k for k in extra if k not in opts["variants"]]
    if "original" not in variants:
        variants.insert(0, "original")
    texts = opts.setdefault("texts", list(E.PPL_TEXTS))
    if not texts or any(t not in E.PPL_TEXTS for t in texts):
        raise EvalError(f"texts {','.join(texts) or '(none)'}: expected one or more of "
                        f"{', '.join(E.PPL_TEXTS)}")
    for v in variants:                      # fail on a bad name before any work
        if v not in extra and parse_variant(v) is None:
            raise EvalError(f"unknown variant {v!r} ({VARIANT_NAMES})")
    for name, path in extra.items():
        if not (path / "config.json").is_file():
            raise EvalError(f"--variant {name}={path}: not a checkpoint directory")
    for text in texts:                      # long enough for every context (else: one line)
        for ctx in opts["contexts"]:
            E.eval_windows(token_stream(tok, E.PPL_TEXTS[text]), ctx, opts["eval_tokens"],
                           f"the {text} text")
        for length in opts["copy_lengths"] if opts.get("copy_n") else ():
            E.copy_windows(token_stream(tok, E.PPL_TEXTS[text]), length, opts["copy_n"],
                           name=f"the {text} text")
    ckpts, metrics = {}, {}
    # compute the most telling variants first (original, calibrated, extra and merged, then
    # init-only); the report keeps the given order
    for v in sorted(variants, key=lambda v: 2 if v in extra else variant_priority(v)):
        ckpts[v] = resolve_variant(v, root, src, extra, opts["progress"])
        metrics[v] = evaluate_variant(v, ckpts[v], root, tok, opts, log)
        if v == "original":
            opts["chat_reference"] = metrics[v].get(CHAT_REF_KEY)
    out = Path(opts["out"])
    write_report(out, variants, ckpts, metrics, opts, command, time.time() - t0)
    log(f"[eval] wrote {out}")
    return out
