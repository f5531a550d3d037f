"""The quality benchmark of the default model's factored variants (`factorkv eval`).

Variants (checkpoints under ``<work>/models/``, built on first use with the converter):
  original      the prepared default model (SmolLM2-135M-Instruct, float32)
  init-rR       `factorkv convert SRC DST --key-rank R`               (training-free init)
  cal-rR        `factorkv convert SRC DST --key-rank R --calibrate`   (current recipe)
  served-rR     the build `factorkv serve --variant thin-rR` serves: the shipped artifact
                (model_patches.conversion.default_variants, its longer recipe) swapped into the original
  merge-kvN     `factorkv convert SRC DST --kv-heads N`               (KV head merging, GQA)
  merge-kvN-real                 ... `--merge-keys real` (non-RoPE-commuting key merge)
  merge-kvN-rec                  ... `--recover` (merged attention trained against the source)
  merge-kvN-recS                 ... `--recover --e2e-steps S` (then S end-to-end KL steps)
  merge-kvN[-real][-rec[S]]-rR, ...-cal-rR    merged, then factored (and calibrated)
  NAME=PATH     any other checkpoint, factored or not (``--variant``)

Metrics (model_patches.evaluation.tasks, plain batched torch, float32), cached per variant in
``<work>/results/<variant>.json`` keyed by the metric's settings and the checkpoint's
fingerprint, so a re-run only computes what is missing:
  * perplexity on the held-out Wikipedia split at each context (non-overlapping windows);
  * passkey accuracy at each length (greedy, exact match of the 5 digits);
  * greedy answers to 5 chat prompts;
  * for one variant, the perplexity recomputed through the vLLM engine (prompt logprobs of
    the same windows) and compared with the torch number.
The report (markdown) is written to ``--out`` (docs/results/quality.md), with a KV bytes
per token vs perplexity table and its plot (``quality-pareto.png`` next to the report).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from model_patches.evaluation.tasks import EvalError

DEFAULT_VARIANTS = ("original", "init-r32", "cal-r32", "init-r16", "cal-r16", "served-r16",
                    "init-r8", "cal-r8",
                    "merge-kv1", "merge-kv1-real", "merge-kv1-r32", "merge-kv1-rec")
PARETO_PNG = "quality-pareto.png"
VARIANT_NAMES = ("original, init-rR, cal-rR, served-rR, merge-kvN[-real][-rec[S]][-rR|-cal-rR], "
                 "or NAME=PATH")


def parse_variant(name: str) -> dict | None:
    """The convert() arguments of a built-in variant name ({} for original), None if the name
    is not one: init-rR, cal-rR, merge-kvN[-real][-rec[S]], merge-kvN[-real][-rec[S]]-rR,
    merge-kvN[-real][-rec[S]]-cal-rR (real: --merge-keys real, rec: --recover, recS:
    --recover --e2e-steps S)."""
    if name == "original":
        return {}
    parts, out = name.split("-"), {}
    if parts[0] == "merge":
        if len(parts) < 2 or not parts[1].startswith("kv") or not parts[1][2:].isdigit():
            return None
        out["kv_heads"] = int(parts[1][2:])
        parts = parts[2:]
        if parts[:1] == ["real"]:
            out["merge_keys"], parts = "real", parts[1:]
        steps = parts[0][3:] if parts and parts[0].startswith("rec") else None
        if steps == "" or (steps or "").isdigit():
            # rec: --recover with its default settings; recS: then S end-to-end steps
            out["recover"], parts = ({"e2e_steps": int(steps)} if steps else {}), parts[1:]
        if not parts:
            return out
        if parts[0] in ("init", "cal"):         # merge-kv1-cal-r32 (merge-kv1-init-r32 = -r32)
            out["calibrate"], parts = parts[0] == "cal", parts[1:]
    elif parts[0] in ("init", "cal"):
        out["calibrate"], parts = parts[0] == "cal", parts[1:]
    elif parts[0] == "served":
        if len(parts) != 2 or not parts[1].startswith("r") or not parts[1][1:].isdigit():
            return None
        return {"served_rank": int(parts[1][1:])}
    else:
        return None
    if len(parts) != 1 or not parts[0].startswith("r") or not parts[0][1:].isdigit():
        return None
    out["key_rank"] = int(parts[0][1:])
    return out


def variant_priority(name: str) -> int:
    """Order of computation: original, calibrated, extra/merged, then init-only variants."""
    spec = parse_variant(name)
    if spec is None:
        return 2
    if not spec:
        return 0
    if spec.get("calibrate") or "recover" in spec or "served_rank" in spec:
        return 1
    return 2 if "kv_heads" in spec else 3


def work_dir(path: str | None = None) -> Path:
    from model_patches.conversion.default_model import cache_root
    return Path(path) if path else cache_root() / "quality"


def _fingerprint(ckpt: Path) -> str:
    h = hashlib.sha256((ckpt / "config.json").read_bytes())
    for f in sorted(ckpt.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class Results:
    """results/<variant>.json: {"fingerprint", "metrics": {key: value}} (reset on a new
    checkpoint)."""

    def __init__(self, root: Path, name: str, ckpt: Path):
        self.path = root / "results" / f"{name}.json"
        self.fp = _fingerprint(ckpt)
        data = {}
        if self.path.exists():
            data = json.loads(self.path.read_text())
        self.metrics = data.get("metrics", {}) if data.get("fingerprint") == self.fp else {}

    def get(self, key):
        return self.metrics.get(key)

    def put(self, key, value) -> None:
        self.metrics[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fp, "metrics": self.metrics}, indent=1))
        os.replace(tmp, self.path)


def resolve_variant(name: str, root: Path, src: Path, extra: dict[str, Path],
                    progress: bool = True) -> Path:
    """Checkpoint dir of a variant; built-in ones (parse_variant) are converted on first use."""
    if name in extra:
        return extra[name]
    if name == "original":
        return src
    spec = parse_variant(name)
    if spec is None:
        raise EvalError(f"unknown variant {name!r} ({VARIANT_NAMES})")
    if "served_rank" in spec:
        from model_patches.conversion.default_variants import prepare_variant
        return prepare_variant(f"thin-r{spec['served_rank']}", quiet=not progress)
    path = root / "models" / name
    if not (path / "config.json").exists():
        from model_patches.conversion.convert import convert
        if "kv_heads" in spec and "key_rank" in spec:
            # merged, then factored: factor the merged variant (built on first use and cached),
            # which is what `convert --kv-heads N --key-rank R` does in a temp dir
            merged = _merged_name(spec)
            src = resolve_variant(merged, root, src, extra, progress)
            spec = {k: v for k, v in spec.items() if k in ("key_rank", "calibrate")}
        t0 = time.time()
        flat = {}                           # recover={"e2e_steps": S} -> --recover --e2e-steps S
        for k, v in spec.items():
            if isinstance(v, dict):
                flat[k] = True
                flat.update(v)
            elif v is not False:
                flat[k] = v
        flags = "".join(f" --{k.replace('_', '-')}" + ("" if v is True else f" {v}")
                        for k, v in flat.items())
        print(f"[eval] building {name}: factorkv convert {src} {path}{flags}", file=sys.stderr,
              flush=True)
        convert(src, path, progress=progress, force=True, **spec)
        print(f"[eval] built {name} in {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


def evaluate_variant(name: str, ckpt: Path, root: Path, tok, opts: dict, log=print) -> dict:
    """Compute the missing metrics of one variant; returns its metrics dict."""
    from tqdm import tqdm

    from model_patches.evaluation import tasks as E
    from model_patches.evaluation.text_sets import token_stream

    res = Results(root, name, ckpt)
    model = None

    def get_model():
        nonlocal model
        if model is None:
            model = E.ThinLM.from_dir(ckpt).eval()
        return model

    stream = token_stream(tok, "evaluation")
    for ctx in opts["contexts"]:
        key = f"ppl/ctx{ctx}/tokens{opts['eval_tokens']}"
        if res.get(key) is None:
            windows = E.eval_windows(stream, ctx, opts["eval_tokens"])
            t0 = time.time()
            with tqdm(total=len(windows), desc=f"{name} ppl ctx {ctx}", unit="window",
                      disable=not opts["progress"]) as bar:
                nll = E.window_nll(get_model(), windows, max(1, 2048 // ctx), bar).double()
            res.put(key, {"ppl": float(nll.mean().exp()), "tokens_scored": nll.numel(),
                          "windows": len(windows), "window_nll": nll.sum(1).tolist(),
                          "seconds": round(time.time() - t0, 1)})
        log(f"[eval] {name} ctx {ctx}: PPL {res.get(key)['ppl']:.3f}")
    n_pk = opts["passkey_n"].get(name, 0)
    for length in opts["passkey_lengths"] if n_pk else ():
        key = f"passkey/len{length}/n{n_pk}/seed{opts['seed']}"
        if opts.get("passkey_engine", "vllm") != "vllm":
            key += "/torch"
        if res.get(key) is None:
            prompts = E.passkey_prompts(tok, length, n_pk, opts["seed"])
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
    if name in opts["chat"] and res.get("chat/v1") is None:
        t0 = time.time()
        res.put("chat/v1", {"answers": E.greedy_chat(get_model(), tok),
                            "seconds": round(time.time() - t0, 1)})
    if name == opts["vllm_variant"]:
        ctx = opts["vllm_ctx"]
        key = f"vllm-ppl/ctx{ctx}/tokens{opts['eval_tokens']}"
        if res.get(key) is None:
            from model_patches.evaluation import vllm_check as evaluate_vllm
            windows = E.eval_windows(stream, ctx, opts["eval_tokens"])
            log(f"[eval] {name}: recomputing ctx {ctx} through vLLM ({windows.numel()} tokens)")
            t0 = time.time()
            out = evaluate_vllm.run(ckpt, windows.tolist(), root / "vllm" / name)
            nll = torch.tensor(out["nll"], dtype=torch.float64)
            res.put(key, {"ppl": float(nll.mean().exp()), "tokens_scored": nll.numel(),
                          "window_nll": nll.sum(1).tolist(), "engine_seconds": out["seconds"],
                          "startup_s": out["startup_s"], "seconds": round(time.time() - t0, 1)})
        log(f"[eval] {name} vLLM ctx {ctx}: PPL {res.get(key)['ppl']:.3f}")
    return res.metrics


def _merged_name(spec: dict) -> str:
    """The merge-only variant a merged-then-factored spec starts from (merge-kvN[-real][-recS])."""
    rec = spec.get("recover")
    return (f"merge-kv{spec['kv_heads']}" + ("-real" if spec.get("merge_keys") == "real" else "")
            + ("" if rec is None else f"-rec{rec.get('e2e_steps', '')}"))


def _cut(info: dict) -> str:
    """Key-cache cut against the unmerged, unfactored source: 1 − H_kv·r / (H_kv_src·D)."""
    kept = info["kv_heads"] * (info["rank"] or info["head_dim"])
    return f"{1 - kept / (info['source_kv_heads'] * info['head_dim']):.1%}".replace(".0%", "%")


def _ckpt_info(ckpt: Path) -> dict:
    from engine.checkpoint import model_dims
    from server.kv_memory import kv_layout

    cfg = json.loads((ckpt / "config.json").read_text())
    fk = cfg.get("factored_keys") or {}
    cal = fk.get("calibration") or {}
    merge = fk.get("kv_head_merge") or cfg.get("kv_head_merge")
    method = fk.get("method") or (f"kv-merge-{merge['merge_keys']}" if merge else "original")
    rec = (merge or {}).get("recovery")
    if rec:                               # kv-merge-complex+recovery[+e2e][+partial-rope...]
        tag = "+recovery" + ("+e2e" if rec.get("e2e") else "")
        head, _, rest = method.partition("+")
        method = head + tag + (f"+{rest}" if rest else "")
    return {"rank": fk.get("key_rank"), "method": method,
            "calib_seconds": cal.get("seconds"), "calib_tokens": cal.get("tokens"),
            "e2e": cal.get("e2e"), "head_dim": fk.get("head_dim") or model_dims(cfg)[3],
            "kv_heads": model_dims(cfg)[2],
            "source_kv_heads": (merge or {}).get("source_kv_heads") or model_dims(cfg)[2],
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


def _kv_rows(variants: list[str], ckpts: dict[str, Path], metrics: dict[str, dict],
             ctxs: list[int], n_tok: int) -> list[dict]:
    base = metrics["original"]
    rows = []
    for v in variants:
        info = _ckpt_info(ckpts[v])
        ppl = {c: metrics[v][f"ppl/ctx{c}/tokens{n_tok}"]["ppl"] for c in ctxs}
        delta = {c: ppl[c] / base[f"ppl/ctx{c}/tokens{n_tok}"]["ppl"] - 1 for c in ctxs}
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


def pareto_plot(path: Path, rows: list[dict], ctxs: list[int]) -> Path:
    """PNG: perplexity against KV bytes per token, one series per context, the Pareto front
    of each drawn as a step line, points labelled with the variant names."""
    import matplotlib
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
    ax.set_ylabel("perplexity (held-out Wikipedia), log scale")
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
    base = metrics["original"]
    ctxs, n_tok = opts["contexts"], opts["eval_tokens"]
    L = ["# Quality benchmark: factored (thin) keys on the default model", "",
         f"SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, head_dim 64), float32, CPU "
         f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads). "
         f"Generated by `factorkv eval` ({time.strftime('%Y-%m-%d')}); wall time of this run "
         f"{seconds / 60:.1f} min (cached results are reused, see below).", "",
         "Reproduce:", "", "```", command, "```", "",
         "## Perplexity", "",
         f"Held-out Wikipedia text (the gensim articles with `sha1(title) mod 3 == 0`, "
         f"model_patches.evaluation.text_sets; calibration never sees them), the first {n_tok:,} tokens "
         f"in non-overlapping windows of each context; every token of a window but the first "
         f"is scored. Plain-torch evaluator (`model_patches/evaluation/tasks.py`).", ""]
    head = "| variant | method | r | key-cache cut | " + " | ".join(
        f"PPL @{c} | Δ @{c}" for c in ctxs) + " |"
    L += [head, "|" + "---|" * (4 + 2 * len(ctxs))]
    for v in variants:
        info = _ckpt_info(ckpts[v])
        cells = []
        for c in ctxs:
            m = metrics[v].get(f"ppl/ctx{c}/tokens{n_tok}")
            b = base.get(f"ppl/ctx{c}/tokens{n_tok}")
            cells += [f"{m['ppl']:.3f}", "–" if v == "original" else
                      f"{100 * (m['ppl'] / b['ppl'] - 1):+.1f}%"]
        L.append(f"| {v} | {info['method']} | {info['rank'] or info['head_dim']} | "
                 f"{_cut(info)} | "
                 + " | ".join(cells) + " |")
    L += ["", "Targets (issue 4): 50% cut ≤ +1%, 75% ≤ +3%, 87.5% ≤ +8%.", ""]
    rows = _kv_rows(variants, ckpts, metrics, ctxs, n_tok)
    plot = pareto_plot(path.parent / PARETO_PNG, rows, ctxs)
    L += ["## KV bytes per token vs perplexity", "",
          "Every variant's KV cache cost per token (fp16 elements, all layers: "
          "Σ_l H_kv · (r_l + D) · 2 bytes; `server/kv_memory.py`) against its perplexity above. "
          "Factored keys shrink r, KV head merging (`--kv-heads`, docs/methods.md) shrinks H_kv, "
          "and the two compose. ★: on the Pareto front at context "
          f"{ctxs[0]} (no variant has both fewer bytes and a lower perplexity).", "",
          *kv_table(rows, ctxs), "",
          "Target (issue 7): ≥ 3× fewer KV bytes per token than the original at ≤ +3% perplexity.",
          "", f"![KV bytes per token vs perplexity]({plot.name})", ""]
    # vLLM check
    vv, vc = opts["vllm_variant"], opts["vllm_ctx"]
    vm = metrics.get(vv, {}).get(f"vllm-ppl/ctx{vc}/tokens{n_tok}") if vv else None
    if vm:
        tm = metrics[vv][f"ppl/ctx{vc}/tokens{n_tok}"]
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
        for v in pk_vars:
            n = opts["passkey_n"][v]
            cells = []
            for length in opts["passkey_lengths"]:
                m = metrics[v].get(f"passkey/len{length}/n{n}/seed{opts['seed']}")
                cells.append(f"{100 * m['accuracy']:.0f}% ({m['n']})" if m else "–")
            L.append(f"| {v} | " + " | ".join(cells) + " |")
        L.append("")
    # chat
    chat_vars = [v for v in variants if metrics[v].get("chat/v1")]
    if chat_vars:
        L += ["## Greedy chat answers, side by side", "",
              "Chat template of the model, greedy, at most 48 new tokens.", ""]
        prompts = [a["prompt"] for a in metrics[chat_vars[0]]["chat/v1"]["answers"]]
        for i, p in enumerate(prompts):
            L += [f"**{p}**", "", "| variant | answer |", "|---|---|"]
            for v in chat_vars:
                ans = metrics[v]["chat/v1"]["answers"][i]["answer"]
                ans = ans.replace("|", "\\|").replace("\n", " ⏎ ")
                L.append(f"| {v} | {ans} |")
            L.append("")
    # timings
    L += ["## Timings and caching", "",
          "Per-variant results are cached in `<work>/results/<variant>.json` (work dir: "
          "`$FACTORKV_CACHE_DIR/quality`, default `~/.cache/factorkv/quality`), keyed by the "
          "metric settings and the checkpoint's fingerprint; a re-run recomputes only what is "
          "missing. Seconds measured when each number was computed:", "",
          "| variant | calibration | " + " | ".join(f"PPL @{c}" for c in ctxs)
          + " | passkey | chat |", "|---|---:|" + "---:|" * (len(ctxs) + 2)]
    for v in variants:
        m, info = metrics[v], _ckpt_info(ckpts[v])
        cal = "–"
        if info["calib_seconds"] is not None:
            cal = f"{info['calib_seconds']:.0f} s"
            if info["e2e"]:
                cal += f" + e2e {info['e2e']['seconds']:.0f} s"
        pk = sum(x.get("seconds", 0) for k, x in m.items() if k.startswith("passkey/"))
        L.append(f"| {v} | {cal} | " + " | ".join(
            f"{m[f'ppl/ctx{c}/tokens{n_tok}']['seconds']:.0f} s" for c in ctxs)
            + f" | {pk:.0f} s | {m.get('chat/v1', {}).get('seconds', 0):.0f} s |")
    L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


def run_benchmark(opts: dict, command: str, log=print) -> Path:
    from transformers import AutoTokenizer

    from model_patches.conversion.default_model import prepare_default_model

    torch.set_num_threads(opts["threads"])
    t0 = time.time()
    root = work_dir(opts.get("work"))
    src = prepare_default_model()
    tok = AutoTokenizer.from_pretrained(str(src))
    extra = {k: Path(v) for k, v in opts["extra"].items()}
    variants = list(opts["variants"]) + [k for k in extra if k not in opts["variants"]]
    if "original" not in variants:
        variants.insert(0, "original")
    for v in variants:                      # fail on a bad name before any work
        if v not in extra and parse_variant(v) is None:
            raise EvalError(f"unknown variant {v!r} ({VARIANT_NAMES})")
    for name, path in extra.items():
        if not (path / "config.json").is_file():
            raise EvalError(f"--variant {name}={path}: not a checkpoint directory")
    ckpts, metrics = {}, {}
    # compute the most telling variants first (original, calibrated, extra and merged, then
    # init-only); the report keeps the given order
    for v in sorted(variants, key=lambda v: 2 if v in extra else variant_priority(v)):
        ckpts[v] = resolve_variant(v, root, src, extra, opts["progress"])
        metrics[v] = evaluate_variant(v, ckpts[v], root, tok, opts, log)
    out = Path(opts["out"])
    write_report(out, variants, ckpts, metrics, opts, command, time.time() - t0)
    log(f"[eval] wrote {out}")
    return out
