"""The report's chat sections: chat fidelity on the 48-prompt chat set (one row per variant,
model_patches.evaluation.chat_fidelity) and the five greedy answers side by side."""

from __future__ import annotations

from model_patches.evaluation.chat_fidelity import CHAT_SET, KINDS, LOOP_REP4

# results keys (quality.run): the original's reference answers, each variant's fidelity
CHAT_REF_KEY, CHAT_SET_KEY = "chat-set-reference/v1/new64", "chat-set/v1/new64"


def chat_seconds(m: dict) -> float:
    """Seconds the variant's chat tasks took (side-by-side answers and chat set)."""
    return sum(m.get(k, {}).get("seconds", 0) for k in ("chat/v1", CHAT_SET_KEY))


def fidelity_table(variants: list[str], metrics: dict[str, dict]) -> list[str]:
    rows = [v for v in variants if metrics[v].get(CHAT_SET_KEY)]
    if not rows:
        return []
    m0 = metrics[rows[0]][CHAT_SET_KEY]
    L = ["## Chat fidelity (48 prompts)", "",
         f"{len(CHAT_SET)} one-turn prompts, 6 of each of {len(KINDS)} kinds "
         f"({', '.join(KINDS)}; `model_patches/evaluation/chat_fidelity.py`); the reference is "
         f"the original's greedy answer (at most {m0['max_new']} tokens). Teacher-forced on the "
         "reference: its tokens' mean NLL (nats per token) and the share where the variant's "
         "likeliest token is the original's (top-1). The variant's own greedy answers: identical "
         "to the original's, tokens equal before the first difference (mean), mean seq-rep-4 "
         "(1 − distinct 4-grams / 4-grams) and the share that loop (seq-rep-4 ≥ "
         f"{LOOP_REP4}: a phrase repeated over and over).", "",
         "| variant | answer NLL | top-1 agreement | identical answers | matching prefix | "
         "seq-rep-4 | loops |", "|---|---:|---:|---:|---:|---:|---:|"]
    for v in rows:
        m = metrics[v][CHAT_SET_KEY]
        L.append(f"| {v} | {m['nll']:.3f} | {100 * m['top1']:.1f}% | {100 * m['same']:.0f}% | "
                 f"{m['prefix']:.1f} | {m['rep4']:.3f} | {100 * m['loops']:.0f}% |")
    return L + [""]


def chat_sections(variants: list[str], metrics: dict[str, dict]) -> list[str]:
    L = fidelity_table(variants, metrics)
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
    return L
