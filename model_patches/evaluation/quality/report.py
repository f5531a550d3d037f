"""The benchmark's report: markdown tables (perplexity on each held-out text, KV bytes per token
vs perplexity with its Pareto front, the vLLM cross-check, long-range copy, passkey, chat
answers and chat fidelity (report_chat), timings) and
the Pareto plot. Results cached before a text existed render as "–" in its cells."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from engine.checkpoint import BLOCK, FactoredKeysConfig, model_dims
from engine.kv_layout import kv_layout
from model_patches.evaluation.quality.report_chat import chat_seconds, chat_sections
from model_patches.evaluation.quality.variants import served_builds
from model_patches.evaluation.tasks import (COPY_SOURCE, COPY_SPAN, PPL_TEXTS, copy_key,
                                            passkey_key, ppl_key)

PARETO_PNG = "{stem}-pareto.png"          # next to the report: quality.md -> quality-pareto.png
SHORT_TEXT = {"wiki": "Wikipedia", "news": "news"}
# per held-out text (tasks.PPL_TEXTS): section title, what the text is, how to read it
PPL_SECTIONS = {
    "wiki": ("Perplexity", "Held-out Wikipedia text (the gensim articles with `sha1(title) mod 3 "
                           "== 0`, model_patches.text_sets; calibration never sees them)", ""),
    "news": ("Perplexity on news (a second held-out kind of text)",
             "Held-out news text (Australian news-mail articles of 2000–01, gensim's Lee "
             "background corpus, model_patches.text_sets; no calibration text is news reporting)",
             " A Δ much worse here than on Wikipedia means a variant fitted its calibration "
             "text's style rather than the language."),
}


def _cut(info: dict) -> str:
    """Key-cache cut against the unmerged, unfactored source: 1 − H_kv·r / (H_kv_src·D)."""
    kept = info["kv_heads"] * (info["rank"] or info["head_dim"])
    return f"{1 - kept / (info['source_kv_heads'] * info['head_dim']):.1%}".replace(".0%", "%")


def ckpt_info(ckpt: Path) -> dict:
    """What the report says about a checkpoint: its method, key rank, KV heads, fp16 KV bytes
    per token and calibration cost."""
    cfg = json.loads((ckpt / "config.json").read_text())
    fk = FactoredKeysConfig.from_hf_config(cfg) if BLOCK in cfg else None
    cal = (fk.calibration if fk else None) or {}
    merge = (fk.kv_head_merge if fk else None) or cfg.get("kv_head_merge")
    method = fk.method if fk else (f"kv-merge-{merge['merge_keys']}" if merge else "original")
    rec = (merge or {}).get("recovery")
    if rec:                               # kv-merge-complex+recovery[+e2e][+partial-rope...]
        tag = "+recovery" + ("+e2e" if rec.get("e2e") else "")
        head, _, rest = method.partition("+")
        method = head + tag + (f"+{rest}" if rest else "")
    _, _, kv_heads, head_dim, _ = model_dims(cfg)
    return {"rank": None if fk is None else (fk.uniform_rank or list(fk.ranks)),
            "method": method, "calib_seconds": cal.get("seconds"),
            "calib_tokens": cal.get("tokens"), "e2e": cal.get("e2e"),
            "head_dim": fk.head_dim if fk else head_dim, "kv_heads": kv_heads,
            "source_kv_heads": (merge or {}).get("source_kv_heads") or kv_heads,
            "kv_bytes": kv_layout(cfg, "fp16").bytes_per_token}


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, loss) that no other point beats on both (ties: first),
    sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def report_texts(opts: dict, metrics: dict[str, dict]) -> list[str]:
    """The held-out texts to report: opts["texts"], else those any variant has results for."""
    ctxs, n_tok = opts["contexts"], opts["eval_tokens"]
    return list(opts.get("texts") or [t for t in PPL_TEXTS if any(
        ppl_key(t, c, n_tok) in m for m in metrics.values() for c in ctxs)] or ["wiki"])


def ppl_table(variants: list[str], ckpts: dict[str, Path], metrics: dict[str, dict],
              text: str, ctxs: list[int], n_tok: int) -> list[str]:
    """Markdown: each variant's perplexity on one held-out text at each context and its change
    against the original ("–" where a result is missing)."""
    base = metrics["original"]
    L = ["| variant | method | r | key-cache cut | " + " | ".join(
        f"PPL @{c} | Δ @{c}" for c in ctxs) + " |", "|" + "---|" * (4 + 2 * len(ctxs))]
    for v in variants:
        info = ckpt_info(ckpts[v])
        cells = []
        for c in ctxs:
            m, b = metrics[v].get(ppl_key(text, c, n_tok)), base.get(ppl_key(text, c, n_tok))
            cells += ["–" if m is None else f"{m['ppl']:.3f}",
                      "–" if v == "original" or m is None or b is None else
                      f"{100 * (m['ppl'] / b['ppl'] - 1):+.1f}%"]
        L.append(f"| {v} | {info['method']} | {info['rank'] or info['head_dim']} | "
                 f"{_cut(info)} | " + " | ".join(cells) + " |")
    return L


def _kv_rows(variants: list[str], ckpts: dict[str, Path], metrics: dict[str, dict],
             ctxs: list[int], n_tok: int, text: str = "wiki") -> list[dict]:
    base = metrics["original"]
    rows = []
    for v in variants:
        info = ckpt_info(ckpts[v])
        ppl = {c: metrics[v][ppl_key(text, c, n_tok)]["ppl"] for c in ctxs}
        delta = {c: ppl[c] / base[ppl_key(text, c, n_tok)]["ppl"] - 1 for c in ctxs}
        rows.append({"variant": v, **info, "ppl": ppl, "delta": delta})
    ref = next(r["kv_bytes"] for r in rows if r["variant"] == "original")
    for r in rows:
        r["ratio"] = r["kv_bytes"] / ref
    return rows


def kv_table(rows: list[dict], ctxs: list[int]) -> list[str]:
    """Markdown: every variant's KV bytes per token (fp16) against its perplexity, cheapest
    cache first; ★ marks the Pareto front at the first context."""
    front = {rows[i]["variant"] for i in pareto_front(
        [(r["kv_bytes"], r["ppl"][ctxs[0]]) for r in rows])}
    L = ["| variant | method | KV heads | key dims | KV bytes / token (fp16) | of original | "
         + " | ".join(f"PPL @{c} | Δ @{c}" for c in ctxs) + " | front |",
         "|---|---|---:|---:|---:|---:|" + "---:|" * (2 * len(ctxs)) + ":---:|"]
    for r in sorted(rows, key=lambda r: (-r["kv_bytes"], r["ppl"][ctxs[0]])):
        cells = []
        for c in ctxs:
            cells += [f"{r['ppl'][c]:.3f}",
                      "–" if r["variant"] == "original" else f"{100 * r['delta'][c]:+.1f}%"]
        L.append(f"| {r['variant']} | {r['method']} | {r['kv_heads']} | "
                 f"{r['rank'] or r['head_dim']} | {r['kv_bytes']:,} | {r['ratio']:.3f} "
                 f"({1 / r['ratio']:.2f}x fewer) | " + " | ".join(cells)
                 + f" | {'★' if r['variant'] in front else ''} |")
    return L


def pareto_plot(path: Path, rows: list[dict], ctxs: list[int], text: str = "Wikipedia") -> Path:
    """PNG: perplexity against KV bytes per token, one series per context, the Pareto front
    of each drawn as a step line, points labelled with the variant names."""
    import matplotlib             # here: slow to import, and only the plot needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    for c, marker in zip(ctxs, "os^dv"):
        xs = [r["kv_bytes"] for r in rows]
        ys = [r["ppl"][c] for r in rows]
        pts = ax.scatter(xs, ys, marker=marker, label=f"PPL @{c} tokens", zorder=3)
        front = pareto_front(list(zip(xs, ys)))
        ax.step([xs[i] for i in front], [ys[i] for i in front], where="post",
                color=pts.get_facecolor()[0], alpha=0.6, zorder=2)
        if c == ctxs[0]:
            for r, x, y in zip(rows, xs, ys):
                ax.annotate(r["variant"], (x, y), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
    orig = next((r for r in rows if r["variant"] == "original"), None)
    if orig is not None:            # the issue-7 target region: ≥ 3x fewer bytes, ≤ +3% PPL
        ax.axvline(orig["kv_bytes"] / 3, color="gray", ls=":", lw=1, label="3x fewer KV bytes")
        ax.axhline(orig["ppl"][ctxs[0]] * 1.03, color="gray", ls="--", lw=1,
                   label=f"+3% PPL @{ctxs[0]}")
    ax.set_xlabel("KV cache bytes per token (fp16, all layers)")
    ax.set_ylabel(f"perplexity (held-out {text}), log scale")
    ax.set_yscale("log")
    ax.set_title("KV memory vs quality: factored keys, KV head merging, both")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(path: Path, variants: list[str], ckpts: dict[str, Path],
                 metrics: dict[str, dict], opts: dict, command: str, seconds: float) -> None:
    ctxs, n_tok = opts["contexts"], opts["eval_tokens"]
    L = ["# Quality benchmark: factored keys (latent and thin) on the default model", "",
         f"SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64), float32, CPU "
         f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads). "
         f"Generated by `factorkv eval` ({time.strftime('%Y-%m-%d')}); wall time of this run "
         f"{seconds / 60:.1f} min (cached results are reused, see below).", "",
         *served_builds(variants), "Reproduce:", "", "```", command, "```", ""]
    texts = report_texts(opts, metrics)
    for text in texts:
        title, about, note = PPL_SECTIONS[text]
        L += [f"## {title}", "",
              f"{about}, the first {n_tok:,} tokens in non-overlapping windows of each context; "
              f"every token of a window but the first is scored. Plain-torch evaluator "
              f"(`model_patches/evaluation/tasks.py`).{note}", "",
              *ppl_table(variants, ckpts, metrics, text, ctxs, n_tok), ""]
        if text == texts[0]:
            L += ["Targets (issue 4): 50% cut ≤ +1%, 75% ≤ +3%, 87.5% ≤ +8%.", ""]
    rows = _kv_rows(variants, ckpts, metrics, ctxs, n_tok, texts[0])
    label = SHORT_TEXT.get(texts[0], texts[0])
    plot = pareto_plot(path.parent / PARETO_PNG.format(stem=path.stem), rows, ctxs, label)
    L += ["## KV bytes per token vs perplexity", "",
          "Every variant's KV cache cost per token (fp16 elements, all layers: "
          f"Σ_l H_kv · (r_l + D) · 2 bytes; `engine/kv_layout.py`) against its perplexity on "
          f"{label} above. "
          "Factored keys shrink r, KV head merging (`--kv-heads`, docs/methods.md) shrinks H_kv, "
          "and the two compose. ★: on the Pareto front at context "
          f"{ctxs[0]} (no variant has both fewer bytes and a lower perplexity).", "",
          *kv_table(rows, ctxs), "",
          "Target (issue 7): ≥ 3× fewer KV bytes per token than the original at ≤ +3% perplexity.",
          "", f"![KV bytes per token vs perplexity]({plot.name})", ""]
    # vLLM check
    vv, vc = opts["vllm_variant"], opts["vllm_ctx"]
    vm = metrics.get(vv, {}).get(f"vllm-ppl/ctx{vc}/tokens{n_tok}") if vv else None
    tm = metrics.get(vv, {}).get(ppl_key("wiki", vc, n_tok)) if vv else None
    if vm and tm:               # (the torch number is there unless --texts left Wikipedia out)
        diffs = [abs(a - b) / n for a, b, n in zip(vm["window_nll"], tm["window_nll"],
                                                    [vc - 1] * len(vm["window_nll"]))]
        L += ["## The served engine computes the same model", "",
              f"The `{vv}` row at context {vc} recomputed through vLLM (the FactorKV engine: "
              "`LLM(model=<checkpoint>, dtype=float32, enforce_eager=True)` in-process, "
              "prompt logprobs of the same windows, `model_patches/evaluation/vllm_check.py`):", "",
              "| variant | ctx | tokens scored | PPL (torch) | PPL (vLLM) | relative diff | "
              "max per-window mean-NLL diff |", "|---|---:|---:|---:|---:|---:|---:|",
              f"| {vv} | {vc} | {vm['tokens_scored']:,} | {tm['ppl']:.4f} | {vm['ppl']:.4f} | "
              f"{abs(vm['ppl'] / tm['ppl'] - 1):.2e} | {max(diffs):.2e} |", "",
              f"(vLLM start-up {vm['startup_s']:.0f} s, scoring {vm['engine_seconds']:.0f} s.)",
              ""]
    # long-range copy
    n_copy = opts.get("copy_n", 0)
    cols = [(t, n) for t in texts for n in opts.get("copy_lengths", [])]
    copy_vars = [v for v in variants
                 if any(copy_key(t, n, n_copy) in metrics[v] for t, n in cols)]
    if n_copy and copy_vars:
        L += ["## Long-range copy", "",
              f"{n_copy} windows per text and length of the held-out text whose last {COPY_SPAN} "
              f"tokens repeat its tokens {COPY_SOURCE}..{COPY_SOURCE + COPY_SPAN - 1} (the copy "
              f"is the window length − {COPY_SOURCE + COPY_SPAN} tokens back); the repeat's "
              f"tokens 2..{COPY_SPAN} scored teacher-forced: mean NLL (nats per token) and, in "
              "brackets, the share the model ranks first (`model_patches.evaluation.tasks."
              "copy_recall`). Ordinary prose, not a salient number in filler: what a user's "
              "quote, code or retrieved passage asks of the cache.", "",
              "| variant | " + " | ".join(f"{SHORT_TEXT[t]} @{n}" for t, n in cols) + " |",
              "|---|" + "---:|" * len(cols)]
        for v in copy_vars:
            cells = [metrics[v].get(copy_key(t, n, n_copy)) for t, n in cols]
            L.append(f"| {v} | " + " | ".join(
                f"{m['nll']:.3f} ({100 * m['top1']:.0f}%)" if m else "–" for m in cells) + " |")
        L.append("")
    # passkey
    pk_vars = [v for v in variants if opts["passkey_n"].get(v)]
    if pk_vars:
        L += ["## Passkey retrieval", "",
              "Prompt: a fixed instruction, filler (\"The grass is green. The sky is blue. ...\" "
              "repeated), `The pass key is NNNNN. Remember it.` after a random number of filler "
              "units (uniform depth), more filler, then `What is the pass key? The pass key is`; "
              "greedy, 8 new tokens, exact match of the first digit run with the 5-digit key "
              f"(seed {opts['seed']}, `model_patches.evaluation.tasks.passkey_prompts`). Run through the "
              "served vLLM engine with prefix caching (the filler prefix is shared; "
              "`--passkey-engine torch` runs the plain-torch evaluator instead, which gives the "
              "same greedy tokens, ~2× slower). The original and "
              "the 75%-cut variant get the full prompt count; other variants fewer (CPU time), "
              "as the n column says.", "",
              "| variant | " + " | ".join(f"accuracy @{n} tokens (n)" for n in
                                         opts["passkey_lengths"]) + " |",
              "|---|" + "---:|" * len(opts["passkey_lengths"])]

        def passkey_rows(forced: bool, cell) -> tuple[list[str], bool]:
            """One table row per variant, cell(metric) per length ("–" where not computed),
            and whether any cell was computed."""
            ms = {v: [metrics[v].get(passkey_key(n, opts["passkey_n"][v], opts["seed"], forced))
                      for n in opts["passkey_lengths"]] for v in pk_vars}
            return ([f"| {v} | " + " | ".join(cell(m) if m else "–" for m in ms[v]) + " |"
                     for v in pk_vars], any(m for row in ms.values() for m in row))

        L += passkey_rows(False, lambda m: f"{100 * m['accuracy']:.0f}% ({m['n']})")[0] + [""]
        forced_rows, any_forced = passkey_rows(
            True, lambda m: f"{100 * m['retrieved']:.0f}% / {m['key_nll']:.3f}")
        if any_forced:
            L += ["Teacher-forced (`model_patches.evaluation.tasks.passkey_forced`, plain torch): "
                  "the same prompts followed by the key; *retrieved* when at every digit the "
                  "likeliest of the ten digits is the key's, and the key digits' NLL (nats, "
                  "summed per prompt, mean over prompts). Greedy accuracy also scores whether the "
                  "model answers with a number at all; this scores only which number.", "",
                  "| variant | " + " | ".join(f"retrieved / key NLL @{n} tokens" for n in
                                             opts["passkey_lengths"]) + " |",
                  "|---|" + "---:|" * len(opts["passkey_lengths"])] + forced_rows + [""]
    L += chat_sections(variants, metrics)
    # timings
    L += ["## Timings and caching", "",
          "Per-variant results are cached in `<work>/results/<variant>.json` (work dir: "
          "`$FACTORKV_CACHE_DIR/quality`, default `~/.cache/factorkv/quality`), keyed by the "
          "metric settings and the checkpoint's fingerprint; a re-run recomputes only what is "
          "missing. Seconds measured when each number was computed:", "",
          "| variant | calibration | " + " | ".join(
              f"PPL{'' if t == 'wiki' else ' ' + t} @{c}" for t in texts for c in ctxs)
          + " | passkey | chat |", "|---|---:|" + "---:|" * (len(texts) * len(ctxs) + 2)]
    for v in variants:
        m, info = metrics[v], ckpt_info(ckpts[v])
        cal = "–"
        if info["calib_seconds"] is not None:
            cal = f"{info['calib_seconds']:.0f} s"
            if info["e2e"]:
                cal += f" + e2e {info['e2e']['seconds']:.0f} s"
        pk = sum(x.get("seconds", 0) for k, x in m.items()
                 if k.startswith(("passkey/", "passkey-forced/")))
        L.append(f"| {v} | {cal} | " + " | ".join(
            f"{m[ppl_key(t, c, n_tok)]['seconds']:.0f} s" if ppl_key(t, c, n_tok) in m else "–"
            for t in texts for c in ctxs)
            + f" | {pk:.0f} s | {chat_seconds(m):.0f} s |")
    L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))
