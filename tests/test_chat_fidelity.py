"""Chat fidelity (model_patches.evaluation.chat_fidelity): the teacher-forced scores equal a
plain forward of prompt + reference answer, a model scored against its own answers agrees
everywhere, repetition is measured as defined, and the benchmark caches the reference with
the original and scores other variants against it."""

from __future__ import annotations

import pytest
import torch

from engine.torch_model import TorchCausalLM
from model_patches.evaluation import chat_fidelity as C
from model_patches.evaluation.tasks import chat_ids
from tests.engine_utils import tiny_llama

PROMPTS = C.CHAT_SET[::12]                      # one prompt from every other kind: 4 prompts


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatfid")
    return [TorchCausalLM.from_dir(tiny_llama(root / f"m{s}", layers=1, hidden=32, heads=2,
                                              kv_heads=1, vocab=49152, seed=s)).eval()
            for s in (0, 1)]


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_model_dir))


def test_chat_set_shape():
    assert len(C.CHAT_SET) == 48 == len(set(C.CHAT_SET))
    assert all(len(qs) == 6 for qs in C.KINDS.values()) and len(C.KINDS) == 8


def test_seq_rep_by_hand():
    assert C.seq_rep(list(range(20))) == 0.0
    assert C.seq_rep([1, 2, 3]) == 0.0                               # no 4-gram pair to compare
    assert C.seq_rep([7] * 10) == pytest.approx(1 - 1 / 7)           # 7 four-grams, 1 distinct
    loop = [5, 6, 7] * 8                                              # "a lone soul, a lone soul"
    assert C.seq_rep(loop) == pytest.approx(1 - 3 / 21) and C.seq_rep(loop) >= C.LOOP_REP4


def test_own_reference_agrees_everywhere(models, tok):
    m = models[0]
    ref = C.reference_answers(m, tok, PROMPTS, max_new=10)
    assert all(0 < len(r) <= 10 for r in ref)
    out = C.chat_fidelity(m, tok, ref, PROMPTS, max_new=10)
    assert out["top1"] == 1.0 and out["same"] == 1.0
    assert out["prefix"] == sum(map(len, ref)) / len(ref)
    assert out["answer_tokens"] == sum(map(len, ref))
    assert [r["rep4"] for r in out["rows"]] == [round(C.seq_rep(r), 4) for r in ref]


def test_other_reference_scores_equal_a_plain_forward(models, tok):
    ref = C.reference_answers(models[1], tok, PROMPTS, max_new=10)
    out = C.chat_fidelity(models[0], tok, ref, PROMPTS, max_new=10)
    nll = agree = 0.0
    with torch.no_grad():
        for q, r in zip(PROMPTS, ref):
            ids = chat_ids(tok, q)
            lp = models[0](torch.tensor([ids + r]))[0, len(ids) - 1:-1].log_softmax(-1)
            nll -= lp[torch.arange(len(r)), r].sum().item()
            agree += (lp.argmax(-1) == torch.tensor(r)).sum().item()
    n = sum(map(len, ref))
    assert out["nll"] == pytest.approx(nll / n, rel=1e-4)
    assert out["top1"] == pytest.approx(agree / n) and out["top1"] < 1.0
    assert out["same"] < 1.0 and out["prefix"] < out["answer_tokens"] / len(ref)
    with pytest.raises(ValueError, match="3 reference answers for 4 prompts"):
        C.chat_fidelity(models[0], tok, ref[:3], PROMPTS)


def test_benchmark_keeps_the_reference_with_the_original(tmp_path, tok, monkeypatch):
    """evaluate_variant: the original stores its answers and scores 100 % against them; another
    variant is scored against the original's answers (opts["chat_reference"]); both reported."""
    from model_patches.evaluation.quality import report_chat
    from model_patches.evaluation.quality.run import evaluate_variant
    monkeypatch.setattr(C, "CHAT_SET", PROMPTS)
    src = [tiny_llama(tmp_path / f"m{s}", layers=1, hidden=32, heads=2, kv_heads=1,
                      vocab=49152, seed=s) for s in (0, 1)]
    opts = {"contexts": [], "eval_tokens": 64, "texts": [], "passkey_n": {},
            "passkey_lengths": [], "seed": 0, "chat": ["original", "v"], "vllm_variant": None,
            "progress": False}
    logs: list[str] = []
    mo = evaluate_variant("original", src[0], tmp_path, tok, opts, logs.append)
    ref = mo[report_chat.CHAT_REF_KEY]
    assert len(ref) == 4 and mo[report_chat.CHAT_SET_KEY]["top1"] == 1.0
    mv = evaluate_variant("v", src[1], tmp_path, tok, {**opts, "chat_reference": ref},
                          logs.append)
    got = mv[report_chat.CHAT_SET_KEY]
    want = C.chat_fidelity(TorchCausalLM.from_dir(src[1]).eval(), tok, ref, PROMPTS)
    assert got["rows"] == want["rows"] and got["nll"] == pytest.approx(want["nll"])
    assert "[eval] v chat set: answer NLL" in logs[-1]
    n_logs = len(logs)
    evaluate_variant("v", src[1], tmp_path, tok, {**opts, "chat_reference": ref}, logs.append)
    assert len(logs) == n_logs                                   # cached: nothing rescored
    other = ref[::-1]                                            # a new reference: rescored
    mv2 = evaluate_variant("v", src[1], tmp_path, tok, {**opts, "chat_reference": other},
                           logs.append)
    assert len(logs) == n_logs + 1 and mv2[report_chat.CHAT_SET_KEY]["reference"] != \
        got["reference"]
    text = "\n".join(report_chat.chat_sections(["original", "v"], {"original": mo, "v": mv}))
    assert "| original | " in text and "| 100.0% | 100% |" in text
    assert f"| v | {got['nll']:.3f} | {100 * got['top1']:.1f}% |" in text
