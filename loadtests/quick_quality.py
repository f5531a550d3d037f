"""Quick quality probe of default-model checkpoints (minutes, not the full benchmark).

    python -m loadtests.quick_quality original served-r16 /path/to/checkpoint [--windows 8]
        [--passkey-n 10] [--texts evaluation,news] [--passkey-scoring greedy,forced]
        [--copy-n 8 --copy-lengths 1024,4096]

Per checkpoint (``original``, ``served-rR`` = the build `factorkv serve --variant thin-rR`
serves, ``served-<variant>`` = that of ``--variant <variant>``, or a directory): perplexity on
the first ``windows`` × 512 tokens of each held-out text (model_patches.text_sets:
``evaluation`` = Wikipedia, ``news``); passkey at 2048 tokens (``--passkey-lengths``) on
``passkey-n`` prompts, scored greedy (``passkeyNk``: the generated answer is the key) and/or
teacher-forced (``passkeyNk_forced``: every digit of the key is the likeliest digit;
``passkeyNk_key_nll``: the key digits' NLL in nats, summed per prompt, mean over prompts);
long-range copy (``copy_<text>_<length>``: ``copy-n`` windows per text and length whose last
32 tokens repeat tokens 64..95; NLL per repeated token and the fraction ranked first,
model_patches.evaluation.tasks.copy_recall); greedy answers (24 tokens) to the 5 fixed chat
prompts; with ``--chat-set``, chat fidelity on the 48 prompts of
model_patches.evaluation.chat_fidelity against the original's greedy answers (64 tokens):
answer NLL and top-1 agreement teacher-forced, identical answers, repetition and loops.
Plain torch (model_patches.evaluation.tasks), float32. One JSON line per checkpoint on
stdout. The full, documented benchmark is `factorkv eval` (docs/results/quality.md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def resolve(name: str) -> Path:
    from model_patches.conversion.default_model import prepare_default_model
    from model_patches.conversion.default_variants import prepare_variant

    if name == "original":
        return prepare_default_model(quiet=True)
    if name.startswith("served-r") and name[8:].isdigit():
        return prepare_variant(f"thin-r{name[8:]}", quiet=True)
    if name.startswith("served-"):                   # served-latent-r16, served-thin-r16
        return prepare_variant(name[len("served-"):], quiet=True)
    return Path(name)


def probe(path: Path, tok, windows: int, passkey_n: int, texts=("evaluation",),
          passkey_lengths=(2048,), chat: bool = True, scoring=("greedy",), copy_n: int = 0,
          copy_lengths=(4096,), chat_reference: list | None = None) -> dict:
    from engine.torch_model import TorchCausalLM
    from model_patches.evaluation.tasks import (copy_recall, copy_windows, eval_windows,
                                                greedy_chat, passkey_accuracy, passkey_forced,
                                                passkey_prompts, perplexity)
    from model_patches.text_sets import token_stream

    t0 = time.time()
    model = TorchCausalLM.from_dir(path).eval()
    out = {}
    for text in texts:
        w = eval_windows(token_stream(tok, text), 512, windows * 512)
        out["ppl" if text == "evaluation" else f"ppl_{text}"] = round(perplexity(model, w)["ppl"], 3)
    for text in texts if copy_n else ():
        for length in copy_lengths:
            r = copy_recall(model, copy_windows(token_stream(tok, text), length, copy_n))
            out[f"copy_{text}_{length}"] = {"nll": round(r["nll"], 4), "top1": round(r["top1"], 3)}
    for length in passkey_lengths if passkey_n else ():
        name = f"passkey{length // 1024}k" if length % 1024 == 0 else f"passkey{length}"
        prompts = passkey_prompts(tok, length, passkey_n)
        if "greedy" in scoring:
            out[name] = passkey_accuracy(model, tok, prompts)["accuracy"]
        if "forced" in scoring:
            forced = passkey_forced(model, tok, prompts)
            out[f"{name}_forced"] = forced["retrieved"]
            out[f"{name}_key_nll"] = round(forced["key_nll"], 3)
    if chat:
        out["chat"] = [a["answer"] for a in greedy_chat(model, tok, max_new=24)]
    if chat_reference is not None:
        from model_patches.evaluation.chat_fidelity import LOOP_REP4, chat_fidelity
        r = chat_fidelity(model, tok, chat_reference)
        out["chat_set"] = {k: round(v, 4) if isinstance(v, float) else v
                           for k, v in r.items() if k != "rows"}
        out["chat_set"]["looping"] = [x["prompt"] for x in r["rows"] if x["rep4"] >= LOOP_REP4]
    out["seconds"] = round(time.time() - t0, 1)
    return out


def _lengths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(n) for n in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token counts, got {text!r}")


def _scorings(text: str) -> tuple[str, ...]:
    names = tuple(text.split(","))
    if not set(names) <= {"greedy", "forced"}:
        raise argparse.ArgumentTypeError(f"expected greedy, forced or greedy,forced, got {text!r}")
    return names


def main() -> None:
    from transformers import AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--passkey-n", type=int, default=10)
    ap.add_argument("--texts", default="evaluation", help="held-out texts, e.g. evaluation,news "
                    "('' for none)")
    ap.add_argument("--passkey-lengths", default="2048", type=_lengths,
                    help="prompt lengths in tokens, e.g. 2048,4096")
    ap.add_argument("--no-chat", action="store_true", help="skip the chat answers")
    ap.add_argument("--copy-n", type=int, default=0, help="long-range copy windows per text "
                    "and length (0: skip)")
    ap.add_argument("--copy-lengths", default="4096", type=_lengths,
                    help="copy window lengths in tokens, e.g. 1024,4096")
    ap.add_argument("--passkey-scoring", default="greedy", type=_scorings,
                    help="greedy (answer generated), forced (key teacher-forced: digit "
                         "retrieval and key NLL), or greedy,forced")
    ap.add_argument("--chat-set", action="store_true", help="chat fidelity on the 48-prompt "
                    "chat set against the original's answers")
    a = ap.parse_args()
    tok = AutoTokenizer.from_pretrained(str(resolve("original")))
    reference = None
    if a.chat_set:
        from engine.torch_model import TorchCausalLM
        from model_patches.evaluation.chat_fidelity import reference_answers
        reference = reference_answers(TorchCausalLM.from_dir(resolve("original")).eval(), tok)
    for name in a.checkpoints:
        path = resolve(name)
        print(json.dumps({"checkpoint": name, **probe(path, tok, a.windows, a.passkey_n,
                                                      [t for t in a.texts.split(",") if t],
                                                      a.passkey_lengths, not a.no_chat,
                                                      a.passkey_scoring, a.copy_n,
                                                      a.copy_lengths, reference)}),
              flush=True)


if __name__ == "__main__":
    main()
