"""The quality benchmark's math (model_patches.evaluation.tasks) on tiny models, and its report."""

from __future__ import annotations

import math

import pytest
import torch

from engine.torch_model import TorchCausalLM, crop_cache
from model_patches.evaluation import tasks as E
from model_patches.conversion.checkpoint_writer import write_rotary_pair_subset
from tests.engine_utils import tiny_llama
from tests.oracle import oracle_logits


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    src = tiny_llama(root / "src", layers=2, hidden=64, heads=4, kv_heads=2)
    thin = write_rotary_pair_subset(src, root / "thin8", 8)
    return src, thin


def _hf_logits(path, ids):
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()(ids).logits


IDS = torch.randint(3, 256, (3, 40), generator=torch.Generator().manual_seed(0))


def test_torch_model_original_matches_transformers(tiny):
    src, _ = tiny
    with torch.no_grad():
        got = TorchCausalLM.from_dir(src)(IDS)
    assert (got - _hf_logits(src, IDS)).abs().max() < 1e-4


def test_torch_model_factored_matches_oracle_and_cache(tiny):
    _, thin = tiny
    m = TorchCausalLM.from_dir(thin)
    with torch.no_grad():
        full = m(IDS)
        for b in range(len(IDS)):
            assert (full[b] - oracle_logits(thin, IDS[b])).abs().max() < 1e-4
        cache: list = []
        m.hidden_states(IDS[:, :25], cache)                  # prefix, then the rest with the cache
        rest = m.logits(m.hidden_states(IDS[:, 25:], cache))
        assert (rest - full[:, 25:]).abs().max() < 1e-4
        cropped = crop_cache(cache, 10)                    # a cropped cache = a shorter prefix
        again = m.logits(m.hidden_states(IDS[:, 10:], list(cropped)))
        assert (again - full[:, 10:]).abs().max() < 1e-4
        assert cache[0][0].shape[2] == 40                    # cropping did not touch the original


def test_perplexity_is_exp_of_mean_nll_by_hand(tiny):
    src, _ = tiny
    stream = torch.randint(3, 256, (500,), generator=torch.Generator().manual_seed(1)).tolist()
    windows = E.eval_windows(stream, 64, 300)                # ceil(300/64) = 5 windows
    assert windows.shape == (5, 64) and windows.flatten().tolist() == stream[:320]
    got = E.perplexity(TorchCausalLM.from_dir(src), windows, batch=2)
    logits = _hf_logits(src, windows)
    nll, n = 0.0, 0
    for w in range(5):
        for t in range(63):
            lp = torch.log_softmax(logits[w, t].double(), -1)
            nll -= lp[windows[w, t + 1]].item()
            n += 1
    assert got["tokens_scored"] == n == 5 * 63
    assert got["ppl"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    with pytest.raises(E.EvalError):
        E.eval_windows(stream, 64, 10_000)


def test_copy_recall_scores_the_repeated_span_by_hand(tiny):
    """copy_windows repeats tokens [source, source + span) at the end of each window and
    touches nothing else; copy_recall's NLL and top-1 are those of the transformers model on
    the repeat's tokens 2..span."""
    src, _ = tiny
    stream = torch.randint(3, 256, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    w = E.copy_windows(stream, 96, 3, span=8, source=10)
    plain = torch.tensor(stream[:288]).view(3, 96)
    assert torch.equal(w[:, :88], plain[:, :88]) and torch.equal(w[:, 88:], plain[:, 10:18])
    got = E.copy_recall(TorchCausalLM.from_dir(src), w, span=8)
    lp = torch.log_softmax(_hf_logits(src, w).double(), -1)[:, 88:95]     # predict 89..95
    target = w[:, 89:]
    nll = -lp.gather(2, target[..., None]).mean().item()
    top1 = (lp.argmax(-1) == target).double().mean().item()
    assert got["tokens_scored"] == 3 * 7 and got["nll"] == pytest.approx(nll, rel=1e-5)
    assert got["top1"] == pytest.approx(top1)
    with pytest.raises(E.EvalError, match="does not fit"):
        E.copy_windows(stream, 96, 1, span=8, source=85)


@pytest.fixture(scope="module")
def tok(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_model_dir))


@pytest.mark.parametrize("length", [300, 2048])
def test_passkey_prompts_deterministic_and_needle_where_said(tok, length):
    a = E.passkey_prompts(tok, length, 12, seed=3)
    b = E.passkey_prompts(tok, length, 12, seed=3)
    assert [(p.ids, p.answer) for p in a] == [(p.ids, p.answer) for p in b]
    assert [p.answer for p in E.passkey_prompts(tok, length, 12, seed=4)] != [p.answer for p in a]
    unit = len(tok(E.PASSKEY_FILLER, add_special_tokens=False)["input_ids"])
    longest = max(a, key=lambda p: p.prefix_len)
    for p in a:
        assert len(p.answer) == 5 and p.answer.isdigit()
        assert length - unit < len(p.ids) <= length
        needle = tok.decode(p.ids[p.needle_start:p.needle_start + p.needle_len])
        assert needle == E.PASSKEY_NEEDLE.format(key=p.answer)
        assert p.answer not in tok.decode(p.ids[:p.needle_start] + p.ids[p.needle_start + p.needle_len:])
        assert tok.decode(p.ids).endswith(E.PASSKEY_QUESTION)
        assert p.ids[:p.prefix_len] == longest.ids[:p.prefix_len]      # shared filler prefix
    depths = [p.needle_start / len(p.ids) for p in a]
    assert max(depths) - min(depths) > 0.3                             # depths vary


def test_extract_passkey():
    assert E.extract_passkey(" 12345.\nThe") == "12345"
    assert E.extract_passkey(" a key 123456") == "123456"
    assert E.extract_passkey(" none") == ""


def test_passkey_accuracy_with_shared_prefix_equals_plain_greedy(tiny, tok):
    """The cached-prefix path gives the same greedy tokens as a forward of the whole prompt."""
    src, _ = tiny
    m = TorchCausalLM.from_dir(src)
    prompts = E.passkey_prompts(tok, 160, 3, seed=0)
    for p in prompts:                      # the tiny model has a 256-token vocabulary
        p.ids = [i % 256 for i in p.ids]
    out = E.passkey_accuracy(m, tok, prompts, max_new=4)
    assert out["n"] == 3 and 0.0 <= out["accuracy"] <= 1.0
    for p, row in zip(prompts, out["rows"]):
        ids = list(p.ids)
        with torch.no_grad():
            for _ in range(4):
                ids.append(int(m(torch.tensor([ids]))[0, -1].argmax()))
        assert row["output"] == tok.decode(ids[len(p.ids):], skip_special_tokens=True)


def test_passkey_forced_equals_a_plain_forward(tiny, tok):
    """Teacher-forced key scoring through the cached prefix equals a forward of prompt + key;
    `retrieved` is the digit-restricted argmax at every digit, so a model whose digit logits
    favour the key's digits retrieves it."""
    src, _ = tiny
    m = TorchCausalLM.from_dir(src)
    prompts = E.passkey_prompts(tok, 160, 3, seed=1)
    for p in prompts:
        p.ids = [i % 256 for i in p.ids]
    out = E.passkey_forced(m, tok, prompts)
    digits = [tok(str(d), add_special_tokens=False)["input_ids"][0] for d in range(10)]
    for p, row in zip(prompts, out["rows"]):
        key = tok(" " + p.answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = m(torch.tensor([p.ids + key]))[0, len(p.ids) - 1:-1].log_softmax(-1)
        pos = [i for i, t in enumerate(key) if t in digits]
        assert len(pos) == 5
        nll = -sum(lp[i, key[i]].item() for i in pos)
        assert abs(row["key_nll"] - nll) < 1e-3
        assert row["retrieved"] == all(digits[int(lp[i, digits].argmax())] == key[i] for i in pos)
    assert out["retrieved"] == sum(r["retrieved"] for r in out["rows"]) / 3
    # a model whose logits favour the key's digits retrieves it
    boosted = _DigitOracle(m, prompts[0].answer, digits)
    assert E.passkey_forced(boosted, tok, prompts[:1])["retrieved"] == 1.0


class _DigitOracle:
    """TorchCausalLM stand-in whose logits favour, at the k-th digit scored, the key's k-th digit."""

    def __init__(self, model, answer, digits):
        self.model, self.want = model, [digits[int(c)] for c in answer]

    def hidden_states(self, x, cache=None):
        return self.model.hidden_states(x, cache)

    def logits(self, hs):
        lg = self.model.logits(hs).clone()
        for k, t in enumerate(self.want[: len(lg)]):
            lg[k, t] += 1e4
        return lg


def test_report_lists_every_variant(tmp_path, tiny):
    from model_patches.evaluation.quality.report import write_report
    src, thin = tiny
    ppl = lambda v: {"ppl": v, "tokens_scored": 63, "window_nll": [63 * math.log(v)],  # noqa: E731
                     "seconds": 1.0}
    metrics = {"original": {"ppl/ctx64/tokens64": ppl(10.0),
                            "passkey/len300/n2/seed0": {"accuracy": 1.0, "n": 2, "seconds": 1},
                            "chat/v1": {"answers": [{"prompt": "hi", "answer": "hello"}],
                                        "seconds": 1}},
               "thin": {"ppl/ctx64/tokens64": ppl(11.0),
                        "vllm-ppl/ctx64/tokens64": {**ppl(11.0), "engine_seconds": 1,
                                                    "startup_s": 2},
                        "chat/v1": {"answers": [{"prompt": "hi", "answer": "a|b"}], "seconds": 1}}}
    opts = {"contexts": [64], "eval_tokens": 64, "vllm_variant": "thin", "vllm_ctx": 64,
            "passkey_n": {"original": 2}, "passkey_lengths": [300], "seed": 0}
    out = tmp_path / "q.md"
    write_report(out, ["original", "thin"], {"original": src, "thin": thin}, metrics, opts,
                 "factorkv eval --x", 60.0)
    text = out.read_text()
    assert "factorkv eval --x" in text and "| thin | rotary-pair-subset | 8 | 50% | 11.000 | +10.0% |" in text
    assert "100% (2)" in text and "a\\|b" in text and "0.00e+00" in text
    assert "Perplexity on news" not in text         # results cached before the news text existed
    assert "Teacher-forced" not in text             # results cached before it was scored
    metrics["original"]["passkey-forced/len300/n2/seed0"] = {"retrieved": 0.5, "key_nll": 1.25,
                                                            "n": 2, "seconds": 2}
    write_report(out, ["original", "thin"], {"original": src, "thin": thin}, metrics, opts,
                 "factorkv eval --x", 60.0)
    text = out.read_text()
    assert "| original | 50% / 1.250 |" in text and "| original | – | 1 s | 3 s | 1 s |" in text
    # with the news text: its own section, and its timing column ("–" where not computed)
    metrics["original"]["ppl-news/ctx64/tokens64"] = ppl(20.0)
    metrics["thin"]["ppl-news/ctx64/tokens64"] = ppl(25.0)
    write_report(out, ["original", "thin"], {"original": src, "thin": thin}, metrics,
                 {**opts, "texts": ["wiki", "news"]}, "factorkv eval --x", 60.0)
    text = out.read_text()
    wiki, news = text.index("## Perplexity\n"), text.index("## Perplexity on news")
    assert wiki < news < text.index("## KV bytes per token")
    assert "| thin | rotary-pair-subset | 8 | 50% | 25.000 | +25.0% |" in text[news:]
    assert "| original | original | 16 | 0% | 20.000 | – |" in text[news:]
    assert "| variant | calibration | PPL @64 | PPL news @64 | passkey | chat |" in text
    del metrics["thin"]["ppl-news/ctx64/tokens64"]       # missing for one variant: "–"
    write_report(out, ["original", "thin"], {"original": src, "thin": thin}, metrics,
                 {**opts, "texts": ["wiki", "news"]}, "factorkv eval --x", 60.0)
    text = out.read_text()
    assert "| thin | rotary-pair-subset | 8 | 50% | – | – |" in text
    assert "| thin | – | 1 s | – |" in text
    assert "## Long-range copy" not in text
    metrics["original"]["copy/wiki/len128/n2"] = {"nll": 1.5, "top1": 0.625, "seconds": 1}
    write_report(out, ["original", "thin"], {"original": src, "thin": thin}, metrics,
                 {**opts, "texts": ["wiki", "news"], "copy_n": 2, "copy_lengths": [128]},
                 "factorkv eval --x", 60.0)
    text = out.read_text()
    assert "| variant | Wikipedia @128 | news @128 |" in text
    assert "| original | 1.500 (62%) | – |" in text and "| thin | 1." not in text
    assert "`factorkv serve --variant" not in text       # no shipped build in this report


def test_report_names_the_shipped_builds():
    """Each served-* variant is tied to its `--variant`, the default flagged, and its recipe."""
    from model_patches.conversion.default_variants import DEFAULT_VARIANT
    from model_patches.evaluation.quality.variants import served_builds
    lines = served_builds(["original", f"served-{DEFAULT_VARIANT}",
                           "served-r16", "cal-r16"])
    assert len(lines) == 3 and lines[-1] == ""
    assert lines[0].startswith(f"- `served-{DEFAULT_VARIANT}`: the default build "
                               f"(`factorkv serve --variant {DEFAULT_VARIANT}`)")
    assert "`served-r16`: a shipped build (`factorkv serve --variant thin-r16`)" in lines[1]
    assert "steps 300" in lines[1] and served_builds(["original"]) == []


def test_evaluate_variant_scores_each_text_once(tmp_path, default_model_dir):
    """Perplexity on Wikipedia and news at each context, cached per variant: a second run
    computes nothing; --texts wiki leaves news out; news keys do not touch the wiki ones."""
    from transformers import AutoTokenizer

    from model_patches.evaluation.quality.run import evaluate_variant
    from model_patches.evaluation.results_cache import Results
    src = tiny_llama(tmp_path / "m", layers=1, hidden=32, heads=2, kv_heads=1, vocab=49152)
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    opts = {"contexts": [32, 64], "eval_tokens": 128, "texts": ["wiki"], "passkey_n": {},
            "passkey_lengths": [], "seed": 0, "chat": [], "vllm_variant": None, "progress": False}
    logs: list[str] = []
    m = evaluate_variant("v", src, tmp_path, tok, opts, logs.append)
    assert sorted(m) == ["ppl/ctx32/tokens128", "ppl/ctx64/tokens128"]
    wiki = dict(m)
    m = evaluate_variant("v", src, tmp_path, tok, {**opts, "texts": ["wiki", "news"]}, logs.append)
    assert sorted(m) == ["ppl-news/ctx32/tokens128", "ppl-news/ctx64/tokens128",
                         "ppl/ctx32/tokens128", "ppl/ctx64/tokens128"]
    assert all(m[k] == wiki[k] for k in wiki)
    news = m["ppl-news/ctx64/tokens128"]
    assert news["windows"] == 2 and news["tokens_scored"] == 2 * 63 and news["ppl"] > 1
    assert m["ppl-news/ctx64/tokens128"]["ppl"] != m["ppl/ctx64/tokens128"]["ppl"]
    assert Results(tmp_path, "v", src).metrics == m            # on disk
    mtime = (tmp_path / "results" / "v.json").stat().st_mtime_ns
    evaluate_variant("v", src, tmp_path, tok, {**opts, "texts": ["wiki", "news"]}, logs.append)
    assert (tmp_path / "results" / "v.json").stat().st_mtime_ns == mtime   # nothing recomputed
    assert "[eval] v news ctx 64: PPL" in logs[-1]
    m = evaluate_variant("v", src, tmp_path, tok, {**opts, "copy_n": 2, "copy_lengths": [192]},
                         logs.append)
    copy = m["copy/wiki/len192/n2"]
    assert copy["tokens_scored"] == 2 * 31 and copy["nll"] > 0 and 0 <= copy["top1"] <= 1
    assert "copy/news/len192/n2" not in m and "[eval] v copy wiki @192: NLL" in logs[-1]
    m = evaluate_variant("v", src, tmp_path, tok, {**opts, "passkey_n": {"v": 2},
                                                   "passkey_lengths": [160],
                                                   "passkey_engine": "torch"}, logs.append)
    prompts = E.passkey_prompts(tok, 160, 2, 0)
    want = E.passkey_forced(TorchCausalLM.from_dir(src).eval(), tok, prompts)
    got = m["passkey-forced/len160/n2/seed0"]
    assert got["rows"] == want["rows"] and got["key_nll"] == want["key_nll"] > 0
    assert m["passkey/len160/n2/seed0/torch"]["n"] == 2 and "teacher-forced" in logs[-1]


@pytest.mark.slow
def test_vllm_prompt_nll_matches_torch(tiny, tmp_path):
    from model_patches.evaluation import vllm_check as evaluate_vllm
    _, thin = tiny
    windows = torch.randint(3, 256, (3, 48), generator=torch.Generator().manual_seed(2))
    ref = E.window_nll(TorchCausalLM.from_dir(thin), windows).double()
    out = evaluate_vllm.run(thin, windows.tolist(), tmp_path, kv_cache_memory_bytes=32 << 20,
                            block_size=16)
    got = torch.tensor(out["nll"], dtype=torch.float64)
    assert got.shape == ref.shape and (got - ref).abs().max() < 1e-3


@pytest.mark.parametrize("args, message", [
    (["--variants", "bogus"], "unknown variant"),
    (["--texts", "wiki,bogus"], "expected one or more of wiki, news"),
    (["--eval-tokens", "100000"], "the news text has"),     # Wikipedia has enough, news not
    (["--copy-n", "-1"], "at least 1 window"),
    (["--copy-n", "4", "--copy-lengths", "30000"], "the news text has"),
    (["--copy-n", "1", "--copy-lengths", "50"], "does not fit 50 tokens"),
])
def test_eval_cli_bad_option_one_line(tmp_path, args, message):
    import subprocess
    import sys

    from tests.engine_utils import ROOT
    proc = subprocess.run([sys.executable, "-m", "server.cli", "eval", "--variants", "original",
                           *args,
                           "--work", str(tmp_path), "--out", str(tmp_path / "q.md"), "-q"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "q.md").exists()


@pytest.mark.slow
def test_passkey_through_vllm_equals_torch(tiny, tok, tmp_path):
    _, thin = tiny                 # (stock CPU attention has no head_dim 16: the thin model only)
    prompts = E.passkey_prompts(tok, 200, 3, seed=1)
    for p in prompts:
        p.ids = [i % 256 for i in p.ids]
    for ckpt in (thin,):
        a = E.passkey_accuracy(TorchCausalLM.from_dir(ckpt), tok, prompts, max_new=5)
        b = E.passkey_accuracy_vllm(ckpt, tok, prompts, tmp_path / ckpt.name, max_new=5)
        assert [r["output"] for r in a["rows"]] == [r["output"] for r in b["rows"]]


def test_calibration_learned_freq_and_e2e_pass(default_model_dir, tmp_path):
    """--calibrate with learned rotary frequencies and an end-to-end pass: the table in the
    checkpoint is the learned one, the e2e KL report is there, the engine reference agrees."""
    import json
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from model_patches.conversion.convert import convert
    torch.manual_seed(0)
    src = tmp_path / "src"
    LlamaForCausalLM(LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / f, src / f)
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 10, "batch": 4, "learn_freq": True,
           "freq_lr": 1e-2, "e2e_steps": 3, "e2e_seq_len": 32, "e2e_batch": 2}
    plain = convert(src, tmp_path / "plain", key_rank=8, keys="thin", init="best-pairs", stat_tokens=4 * 512,
                    progress=False)
    s = convert(src, tmp_path / "cal", key_rank=8, keys="thin", init="best-pairs", calibrate=True,
                calibration=cal, stat_tokens=4 * 512, progress=False)
    fk = json.loads((s.dst / "config.json").read_text())["factored_keys"]
    fk0 = json.loads((plain.dst / "config.json").read_text())["factored_keys"]
    assert fk["calibration"]["learned_rotary_freq"] and fk["calibration"]["e2e"]["steps"] == 3
    assert fk["rotary_inv_freq"] != fk0["rotary_inv_freq"]
    assert not (tmp_path / ".cal.calib").exists()
    ids = torch.randint(3, 49152, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        diff = (TorchCausalLM.from_dir(s.dst)(ids)[0] - oracle_logits(s.dst, ids[0])).abs().max()
    assert diff < 1e-4
    # the e2e pass alone, on an existing checkpoint (layer-wise stage not repeated)
    from model_patches.conversion.distill import e2e_checkpoint
    out = e2e_checkpoint(src, plain.dst, tmp_path / "e2e", progress=False, e2e_steps=2,
                         e2e_seq_len=32, e2e_batch=2)
    fk2 = json.loads((out / "config.json").read_text())["factored_keys"]
    assert fk2["method"].endswith("+e2e") and fk2["calibration"]["e2e"]["steps"] == 2
    assert fk2["rotary_inv_freq"] == fk0["rotary_inv_freq"]
    with torch.no_grad():
        diff = (TorchCausalLM.from_dir(out)(ids)[0] - oracle_logits(out, ids[0])).abs().max()
    assert diff < 1e-4 and not (tmp_path / ".e2e.calib").exists()


def test_served_variant_names():
    from model_patches.evaluation.quality.variants import parse_variant, variant_priority

    assert parse_variant("served-r16") == {"served_rank": 16}
    assert parse_variant("served-latent-r16") == {"served_rank": 16, "served_keys": "latent"}
    assert parse_variant("served-thin-r16") is None
    assert parse_variant("served-16") is None and parse_variant("served-r16-x") is None
    assert variant_priority("served-r16") == 1
