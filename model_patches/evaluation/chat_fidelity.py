"""Chat fidelity: how closely a compact build answers chat prompts as the original does, on
:data:`CHAT_SET` (48 single-turn prompts, 6 of each of 8 kinds; written for this benchmark,
none in any calibration text). Five side-by-side answers (tasks.greedy_chat) show what the
answers look like; this measures, over many prompts, what one answer cannot:

* reference: the original's greedy answer to each prompt (at most ``max_new`` tokens, ended
  at the end of turn), :func:`reference_answers`;
* teacher-forced on the reference (:func:`chat_fidelity`): the answer tokens' mean NLL
  (nats / token; the original's own is the floor) and top-1 agreement (the fraction of answer
  tokens where the build's likeliest next token is the original's);
* the build's own greedy answers: ``same`` (the fraction identical to the reference),
  ``prefix`` (mean tokens equal to the reference before the first difference), ``rep4``
  (mean seq-rep-4 = 1 − distinct 4-grams / 4-grams of an answer; Welleck et al. 2020) and
  ``loops`` (the fraction of answers with seq-rep-4 ≥ :data:`LOOP_REP4`: a phrase repeated
  over and over, "a lone soul, a lone soul, ..."). Compare a build's rep4 and loops with the
  original's on the same prompts: a greedy 135M model repeats itself now and then too.
"""

from __future__ import annotations

import torch

from engine.torch_model import TorchCausalLM
from model_patches.evaluation.tasks import chat_ids, greedy, stop_ids

KINDS = {
    "fact": ("What is the capital of Japan?", "Who wrote Romeo and Juliet?",
             "What is the largest planet in the solar system?",
             "At what temperature does water boil at sea level?",
             "Which ocean lies between Africa and Australia?",
             "What gas do plants take in from the air?"),
    "explain": ("Explain what photosynthesis is in simple words.",
                "Why is the sky blue?", "What does a database index do?",
                "Explain the difference between weather and climate.",
                "What is inflation in economics?", "How does a vaccine protect the body?"),
    "howto": ("How do I make a cup of tea?", "Give me four tips for a job interview.",
              "How can I save money on groceries?", "How do I change a flat bicycle tyre?",
              "What should I pack for a weekend camping trip?",
              "How can I fall asleep faster?"),
    "creative": ("Write a short poem about autumn leaves.",
                 "Write a haiku about the moon.",
                 "Tell me a two-sentence story about a lost cat.",
                 "Write a limerick about a programmer.",
                 "Describe a sunrise over the mountains in three sentences.",
                 "Write a short poem about the rain in the city."),
    "math": ("What is 7 times 8?", "What is 15 plus 27?",
             "If I have 10 apples and eat 3, how many are left?",
             "What is half of 64?", "How many minutes are in two hours?",
             "A train travels 60 km in one hour. How far does it go in three hours?"),
    "code": ("Write a Python function that returns the square of a number.",
             "How do I reverse a list in Python?",
             "Write a SQL query that selects all rows from a table named users.",
             "What does the HTML tag <p> mean?",
             "Write a Python loop that prints the numbers 1 to 5.",
             "What is a variable in programming?"),
    "rewrite": ("Translate to French: Good morning, how are you?",
                "Make this sentence more formal: hey, can u send me the file?",
                "Summarize in one sentence: The meeting was moved from Monday to Wednesday "
                "because the manager was travelling, and everyone must bring their reports.",
                "Correct the grammar: She don't like apples and he go to school.",
                "Rewrite this as a question: The library opens at nine.",
                "Give a title for a story about a girl who learns to fly."),
    "list": ("Name five fruits that are red.", "List three primary colours.",
             "Name four animals that live in the ocean.",
             "List the days of the week.", "Name three famous painters.",
             "Give me three words that rhyme with cat."),
}
CHAT_SET = tuple(q for qs in KINDS.values() for q in qs)
LOOP_REP4 = 0.5


def seq_rep(tokens: list[int], n: int = 4) -> float:
    """1 − distinct n-grams / n-grams (0 for an answer shorter than n + 1 tokens)."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def _answer(gen: list[int], stop: set[int]) -> list[int]:
    """The generated tokens up to (and without) the end of turn."""
    for i, t in enumerate(gen):
        if t in stop:
            return gen[:i]
    return gen


@torch.no_grad()
def reference_answers(model: TorchCausalLM, tok, prompts=None, max_new: int = 64,
                      progress=None) -> list[list[int]]:
    """Greedy answers (token ids, end of turn removed) of the reference model to `prompts`
    (default :data:`CHAT_SET`)."""
    stop, out = stop_ids(tok), []
    prompts = CHAT_SET if prompts is None else prompts
    for q in prompts:
        out.append(_answer(greedy(model, chat_ids(tok, q), max_new, stop=stop), stop))
        if progress is not None:
            progress.update(1)
    return out


@torch.no_grad()
def chat_fidelity(model: TorchCausalLM, tok, reference: list[list[int]], prompts=None,
                  max_new: int = 64, progress=None) -> dict:
    """The module's metrics for `model` against the reference answers (see the docstring)."""
    prompts = CHAT_SET if prompts is None else prompts
    if len(reference) != len(prompts):
        raise ValueError(f"{len(reference)} reference answers for {len(prompts)} prompts")
    stop, rows = stop_ids(tok), []
    nll_sum = agree = n_tok = 0.0
    for q, ref in zip(prompts, reference):
        ids = chat_ids(tok, q)
        if ref:
            hs = model.hidden_states(torch.tensor([ids + ref]))[0, len(ids) - 1:-1]
            lp = model.logits(hs).float().log_softmax(-1)                    # [len(ref), V]
            target = torch.tensor(ref)
            nll_sum += -lp.gather(1, target[:, None]).sum().item()
            agree += (lp.argmax(-1) == target).sum().item()
            n_tok += len(ref)
        own = _answer(greedy(model, ids, max_new, stop=stop), stop)
        prefix = next((i for i, (a, b) in enumerate(zip(own, ref)) if a != b), min(len(own), len(ref)))
        rows.append({"prompt": q, "answer": tok.decode(own, skip_special_tokens=True).strip(),
                     "same": own == ref, "prefix": prefix, "rep4": round(seq_rep(own), 4)})
        if progress is not None:
            progress.update(1)
    n = len(rows)
    return {"n": n, "max_new": max_new, "answer_tokens": int(n_tok),
            "nll": nll_sum / max(n_tok, 1), "top1": agree / max(n_tok, 1),
            "same": sum(r["same"] for r in rows) / n,
            "prefix": sum(r["prefix"] for r in rows) / n,
            "rep4": sum(r["rep4"] for r in rows) / n,
            "loops": sum(r["rep4"] >= LOOP_REP4 for r in rows) / n, "rows": rows}
