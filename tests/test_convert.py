"""`factorkv convert`: exactness where the math says exact, serving, calibration, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from engine.torch_model import TorchCausalLM
from engine.weights import load_checkpoint
from model_patches.conversion.calibrate import calibrate_layer
from model_patches.conversion.convert import ConversionError, convert
from tests.engine_utils import ROOT, run_vllm, tiny_llama

VOCAB = 49152          # the default model's tokenizer, so the converter reads real text
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def _with_tokenizer(path, default_model_dir):
    for f in TOKENIZER_FILES:
        if (default_model_dir / f).exists():
            shutil.copy(default_model_dir / f, path / f)
    return path


@pytest.fixture(scope="module")
def sources(default_model_dir, tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    root = tmp_path_factory.mktemp("convert-src")
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).eval()
    llama.save_pretrained(root / "llama")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=1024, bos_token_id=1, eos_token_id=2)).eval()
    with torch.no_grad():   # make every key head exactly rank 4: W_k^h = A_h B_h
        w = gpt2.transformer.h[0].attn.c_attn.weight       # Conv1D [in, 3*out]
        for layer in gpt2.transformer.h:
            w = layer.attn.c_attn.weight
            for hh in range(4):
                cols = slice(64 + hh * 16, 64 + (hh + 1) * 16)
                w[:, cols] = torch.randn(64, 4) @ torch.randn(4, 16) * 0.3
    gpt2.save_pretrained(root / "gpt2_rank4")
    return {"llama": _with_tokenizer(root / "llama", default_model_dir),
            "gpt2": _with_tokenizer(root / "gpt2_rank4", default_model_dir)}


def _logits(path, ids):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(str(path)).eval()(ids[None]).logits[0]


IDS = torch.randint(100, VOCAB, (48,), generator=torch.Generator().manual_seed(3))
SMALL = dict(stat_tokens=4 * 512, progress=False)


@pytest.mark.parametrize("init", ["best-pairs", "partial-rope"])
def test_full_rank_conversion_reproduces_llama(sources, tmp_path, init):
    convert(sources["llama"], tmp_path / "fr", key_rank=16, keys="thin", init=init, **SMALL)
    diff = (TorchCausalLM.from_dir(tmp_path / "fr")(IDS) - _logits(sources["llama"], IDS)).abs().max()
    assert diff < 1e-4


@pytest.mark.parametrize("groups,init", [(1, None), (2, None), (1, "qpca-attn")])
def test_full_rank_latent_conversion_reproduces_llama(sources, tmp_path, groups, init):
    """Latent keys at r = D: B A = U Uᵀ W_K with U orthogonal (query-weighted: B P = I), i.e.
    the original keys."""
    s = convert(sources["llama"], tmp_path / "fr", key_rank=16, latent_groups=groups, init=init,
                **SMALL)
    cfg = json.loads((s.dst / "config.json").read_text())["factored_keys"]
    assert (cfg["key_mode"], cfg["latent_groups"], cfg["method"]) == \
        ("latent", groups, f"latent-{init or 'pca'}")
    diff = (TorchCausalLM.from_dir(s.dst)(IDS) - _logits(sources["llama"], IDS)).abs().max()
    assert diff < 1e-4


def test_query_weighted_latent_factors_minimise_the_score_error():
    """latent_group_factors: B P = I at full rank; with a metric M it attains the least
    E[(k − k̂)ᵀ M (k − k̂)] (the dropped eigenvalues), below plain PCA's, and plain PCA the least
    E‖k − k̂‖²."""
    from model_patches.conversion.latent_init import latent_group_factors
    g = torch.Generator().manual_seed(0)
    wk = torch.randn(12, 20, generator=g, dtype=torch.float64)
    x = torch.randn(20, 20, generator=g, dtype=torch.float64)
    cx = x @ x.T / 20
    q = torch.randn(12, 12, generator=g, dtype=torch.float64)
    metric = q @ torch.diag(torch.linspace(0.01, 5, 12, dtype=torch.float64)) @ q.T

    def err(p, b, m):
        e = torch.eye(12, dtype=torch.float64) - b @ p           # k − k̂ = (I − B P) k
        return float(torch.trace(m @ e @ wk @ cx @ wk.T @ e.T))
    p, b = latent_group_factors(wk, cx, 12, metric)
    assert torch.allclose(b @ p, torch.eye(12, dtype=torch.float64), atol=1e-8)
    pw, bw = latent_group_factors(wk, cx, 4, metric)
    pp, bp = latent_group_factors(wk, cx, 4)
    s = torch.linalg.cholesky(metric)
    dropped = torch.linalg.eigvalsh(s.T @ wk @ cx @ wk.T @ s)[:8].sum()
    assert abs(err(pw, bw, metric) - float(dropped)) < 1e-6 * float(dropped)
    assert err(pw, bw, metric) < 0.9 * err(pp, bp, metric)
    eye = torch.eye(12, dtype=torch.float64)
    assert err(pp, bp, eye) < err(pw, bw, eye)


def test_attention_weighted_moments(sources):
    """Weights sqrt(received attention): one-token windows receive sqrt(H) each (so the moments
    equal the plain ones); longer windows weight tokens unequally."""
    from model_patches.conversion.activation_stats import input_moments
    plain = input_moments(sources["llama"], 64, seq_len=1, progress=False)
    one = input_moments(sources["llama"], 64, seq_len=1, progress=False, attention_weighted=True)
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(plain, one))
    plain = input_moments(sources["llama"], 512, seq_len=256, progress=False)
    weighted = input_moments(sources["llama"], 512, seq_len=256, progress=False,
                             attention_weighted=True)
    for a, b in zip(plain, weighted):
        assert (a - b).abs().max() > 1e-3 * a.abs().max()
        assert torch.linalg.eigvalsh(b).min() > -1e-9 * b.abs().max()


def test_latent_keys_beat_thin_keys_at_the_same_cache(default_model_dir, tmp_path):
    """Training-free, at r = 4 of 16: the latent model (exact RoPE, one joint latent) is closer
    to the source than thin keys (RoPE on 4 dims), and the per-head latent lies between. The
    source has peaked attention (tiny_llama: q/k weights x4), so key errors show in the KL."""
    src = _with_tokenizer(tiny_llama(tmp_path / "src", hidden=64, vocab=VOCAB), default_model_dir)
    ref = torch.log_softmax(_logits(src, IDS), -1)

    def kl(dst):
        lp = torch.log_softmax(TorchCausalLM.from_dir(dst)(IDS), -1)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())
    joint = kl(convert(src, tmp_path / "j", key_rank=4, **SMALL).dst)
    per_head = kl(convert(src, tmp_path / "h", key_rank=4, latent_groups=2, **SMALL).dst)
    thin = kl(convert(src, tmp_path / "t", key_rank=4, keys="thin", **SMALL).dst)
    assert joint <= per_head * 1.01 and joint < thin, (joint, per_head, thin)


def test_no_rope_rank_r_keys_convert_exactly(sources, tmp_path):
    """GPT-2 without RoPE, key heads of rank 4: conversion at r = 4 is exact algebra."""
    s = convert(sources["gpt2"], tmp_path / "r4", key_rank=4, **SMALL)
    assert s.ranks == [4, 4]
    diff = (TorchCausalLM.from_dir(tmp_path / "r4")(IDS) - _logits(sources["gpt2"], IDS)).abs().max()
    assert diff < 1e-3


@pytest.mark.slow
def test_converted_models_serve_through_engine(sources, tmp_path):
    for name, rank in (("llama", 8), ("gpt2", 4)):
        dst = convert(sources[name], tmp_path / name, key_rank=rank, **SMALL).dst
        prompt = IDS[:30].tolist()
        out = run_vllm(dst, [[{"prompt": prompt, "max_tokens": 6}]], tmp_path,
                       kv_cache_memory_bytes=32 << 20, block_size=16)
        got = out["rounds"][0][0]["tokens"]
        ref = TorchCausalLM.from_dir(dst)(torch.tensor(prompt + got))
        assert got == ref[len(prompt) - 1:-1].argmax(-1).tolist(), name


@pytest.mark.slow
def test_calibration_reduces_layer_error_and_resumes(sources, tmp_path):
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 25, "batch": 4}
    s = convert(sources["llama"], tmp_path / "cal", key_rank=4, keys="thin", init="best-pairs",
                calibrate=True, calibration=cal, **SMALL)
    cfg = json.loads((s.dst / "config.json").read_text())
    layers = cfg["factored_keys"]["calibration"]["layers"]
    assert cfg["factored_keys"]["method"] == "best-pairs+calibrated"
    assert all(x["relative_mse_after"] < x["relative_mse_before"] for x in layers)
    assert not (tmp_path / ".cal.calib").exists()          # progress removed when done
    # resume: a progress file for layer 1 is picked up (same fingerprint) and finishes the rest
    from model_patches.conversion import calibrate as C
    calls = []
    real = C.calibrate_layer

    def spy(teacher, student, i, *args, **kwargs):
        calls.append(i)
        return real(teacher, student, i, *args, **kwargs)
    C.calibrate_layer = spy
    try:
        orig_save = torch.save

        def stop_after_first(obj, f, *a, **k):
            orig_save(obj, f, *a, **k)
            if isinstance(obj, dict) and obj.get("layer") == 1:
                raise KeyboardInterrupt
        torch.save = stop_after_first
        with pytest.raises(KeyboardInterrupt):
            convert(sources["llama"], tmp_path / "cal2", key_rank=4, keys="thin",
                    init="best-pairs", calibrate=True, calibration=cal, **SMALL)
        torch.save = orig_save
        assert not (tmp_path / "cal2").exists()              # nothing that looks like a model
        convert(sources["llama"], tmp_path / "cal2", key_rank=4, keys="thin",
                init="best-pairs", calibrate=True, calibration=cal, **SMALL)
    finally:
        torch.save = orig_save
        C.calibrate_layer = real
    assert calls == [0, 1]                                    # layer 0 was not redone
    assert (tmp_path / "cal2" / "config.json").exists()


def test_latent_calibration_trains_q_a_b_and_reduces_layer_error(sources, tmp_path):
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 20, "batch": 4, "lr": 3e-3}
    init = convert(sources["llama"], tmp_path / "init", key_rank=4, **SMALL).dst
    s = convert(sources["llama"], tmp_path / "cal", key_rank=4, calibrate=True, calibration=cal,
                **SMALL)
    block = json.loads((s.dst / "config.json").read_text())["factored_keys"]
    assert block["method"] == "latent-pca+calibrated" and block["key_mode"] == "latent"
    assert block["calibration"]["lr"] == 3e-3
    assert all(x["relative_mse_after"] < x["relative_mse_before"]
               for x in block["calibration"]["layers"])
    a, b = TorchCausalLM.from_dir(init).w, TorchCausalLM.from_dir(s.dst).w
    for name in ("q_proj", "k_proj", "k_up_proj"):
        assert not torch.equal(a[f"model.layers.0.self_attn.{name}.weight"],
                               b[f"model.layers.0.self_attn.{name}.weight"]), name
    assert torch.equal(a["model.layers.0.self_attn.v_proj.weight"],
                       b["model.layers.0.self_attn.v_proj.weight"])


def test_pos_skip_calibration_sees_long_distances(sources, tmp_path, monkeypatch):
    """pos_skip / e2e_pos_skip = P: both stages get per-window positions (skipped_positions),
    the report records P, and a P outside window length .. the model's positions fails before
    anything is written."""
    from model_patches.conversion import calibrate, distill
    seen, e2e_limits = [], []
    real, real_positions = calibrate.calibrate_layer, distill.skipped_positions

    def spy(teacher, student, i, x, pos, *args, **kwargs):
        seen.append(pos.clone())
        return real(teacher, student, i, x, pos, *args, **kwargs)

    def positions_spy(n, seq_len, limit, seed=0):
        e2e_limits.append(limit)
        return real_positions(n, seq_len, limit, seed)
    monkeypatch.setattr(calibrate, "calibrate_layer", spy)
    monkeypatch.setattr(distill, "skipped_positions", positions_spy)
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 3, "batch": 4, "pos_skip": 512,
           "e2e_steps": 1, "e2e_seq_len": 64, "e2e_batch": 2, "e2e_pos_skip": 256}
    s = convert(sources["llama"], tmp_path / "cal", key_rank=4, calibrate=True, calibration=cal,
                **SMALL)
    assert len(seen) == 2 and all(p.shape == (8, 64) for p in seen)
    assert seen[0].max() > 64 and seen[0].max() < 512 and e2e_limits == [256]
    report = json.loads((s.dst / "config.json").read_text())["factored_keys"]["calibration"]
    assert report["pos_skip"] == 512 and report["e2e"]["pos_skip"] == 256
    longest = json.loads((sources["llama"] / "config.json").read_text())["max_position_embeddings"]
    for bad in ({"pos_skip": longest + 1}, {"pos_skip": 32}, {"e2e_steps": 1, "e2e_seq_len": 64,
                                                             "e2e_pos_skip": longest + 1}):
        with pytest.raises(ConversionError, match=f"pos_skip .* is outside .*{longest}"):
            convert(sources["llama"], tmp_path / "far", key_rank=4, calibrate=True,
                    calibration={**cal, **bad}, **SMALL)
        assert not (tmp_path / "far").exists()


def test_attention_at_per_window_positions(sources, tmp_path):
    """Positions given per window ([B, T]) rotate each window as its own [T] positions would."""
    m = TorchCausalLM.from_dir(convert(sources["llama"], tmp_path / "init", key_rank=4,
                                       **SMALL).dst)
    ids = torch.randint(0, m.w["model.embed_tokens.weight"].shape[0], (2, 10),
                        generator=torch.Generator().manual_seed(0))
    pos = torch.stack([torch.arange(10), torch.arange(10) + (torch.arange(10) >= 4) * 300])
    n = m.attn_norm(0, m.embed(ids, pos))
    each = torch.cat([m.attention(0, n[j:j + 1], pos[j]) for j in range(2)])
    torch.testing.assert_close(m.attention(0, n, pos), each)
    assert not torch.allclose(each[1], m.attention(0, n[1:], pos[0])[0])


def test_varied_calibration_text_reaches_both_stages(sources, tmp_path, monkeypatch):
    """varied_mix / e2e_varied_mix are handed to calibration_windows by the layer-wise and the
    end-to-end stage, and the checkpoint's calibration report records them."""
    from model_patches.conversion import calibrate, distill
    seen = []

    def spy(real):
        def windows(*args, **kwargs):
            seen.append(kwargs.get("varied_mix", 0.0))
            return real(*args, **kwargs)
        return windows
    monkeypatch.setattr(calibrate, "calibration_windows", spy(calibrate.calibration_windows))
    monkeypatch.setattr(distill, "calibration_windows", spy(distill.calibration_windows))
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 2, "batch": 4, "varied_mix": 0.25,
           "e2e_steps": 1, "e2e_seq_len": 64, "e2e_batch": 2, "e2e_varied_mix": 0.125}
    s = convert(sources["llama"], tmp_path / "cal", key_rank=4, calibrate=True, calibration=cal,
                **SMALL)
    assert seen == [0.25, 0.125]
    report = json.loads((s.dst / "config.json").read_text())["factored_keys"]["calibration"]
    assert report["varied_mix"] == 0.25 and report["e2e"]["varied_mix"] == 0.125


def test_short_calibration_text_fails_before_any_stage_runs(sources, tmp_path, monkeypatch):
    """A window set the texts cannot fill (here the end-to-end stage's) is a ConversionError
    raised before the layer-wise stage spends any time, and nothing is written."""
    from model_patches.conversion import calibrate

    def never(*a, **k):
        raise AssertionError("the layer-wise stage ran")
    monkeypatch.setattr(calibrate, "calibrate_layer", never)
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 2, "batch": 4, "chat_mix": 0.0,
           "e2e_steps": 1, "e2e_seq_len": 64, "e2e_chat_mix": 0.0, "e2e_varied_mix": 0.9}
    with pytest.raises(ConversionError, match="windows of 64 tokens"):
        convert(sources["llama"], tmp_path / "cal", key_rank=4, calibrate=True, calibration=cal,
                **SMALL)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, needle", [
    (["--key-rank", "32"], "outside"),                  # head_dim is 16
    (["--keys", "thin", "--key-rank", "5"], "odd"),
    (["--key-cache-ratio", "0"], "key-cache-ratio"),
    (["--key-rank", "4", "--latent-groups", "3"], "must divide the 2 KV heads"),
    (["--key-rank", "4", "--init", "best-pairs"], "is not a latent-key initialisation"),
    (["--keys", "thin", "--key-rank", "4", "--init", "qpca"], "is not one of truncated"),
    (["--keys", "thin", "--key-rank", "4", "--latent-groups", "2"], "applies to --keys latent"),
    (["--key-rank", "4", "--calibrate", "--calib-varied-mix", "1.5"], "must be in [0, 1]"),
    (["--key-rank", "4", "--calibrate", "--calib-varied-mix", "0.75"], "exceed 1"),
    (["--key-rank", "4", "--calibrate", "--calib-pos-skip", "100"], "pos_skip 100 is outside 256.."),
    (["--key-rank", "4", "--calibrate", "--calib-lr", "0"], "--calib-lr must be positive"),
    (["--key-rank", "4", "--calibrate", "--calib-long-steps", "-1"], "must be at least 0"),
    # 2,048-token long windows on a model of 1,024 positions: refused before any stage runs
    (["--key-rank", "4", "--calibrate", "--calib-long-steps", "5"], "the model's 1024 positions"),
    (["--key-rank", "4", "--calib-lr", "1e-3"], "need --calibrate"),
    # the end-to-end stage (every 256-token window of the calibration stream) asks for more
    # varied windows than the varied texts hold: refused before the layer-wise stage runs
    (["--key-rank", "4", "--calibrate", "--calib-chat-mix", "0", "--calib-varied-mix", "0.9",
      "--e2e-steps", "1"], "windows of 256 tokens"),
])
def test_bad_arguments_one_line_exit_2(sources, tmp_path, args, needle):
    dst = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "convert", str(sources["llama"]),
                           str(dst), *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr
    assert not dst.exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_or_unreadable_source(tmp_path, sources):
    bad = tmp_path / "bert"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    trunc = tmp_path / "trunc"
    shutil.copytree(sources["llama"], trunc)
    data = (trunc / "model.safetensors").read_bytes()
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 3])
    for src, needle in ((bad, "unsupported architecture"), (tmp_path / "missing", "config.json"),
                        (trunc, "unreadable")):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "convert", str(src),
                               str(tmp_path / "o"), "--key-rank", "8"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "o").exists()


def test_source_without_or_with_a_foreign_tokenizer(tmp_path, default_model_dir):
    """A source directory with no tokenizer, or with one whose ids exceed the model's embedding
    (here SmolLM2's 49,152 tokens on a 256-row model): one line, exit 2, no output."""
    src = tiny_llama(tmp_path / "src", vocab=256)
    for needle in ("no usable tokenizer", "49152 tokens but the model's embedding has only 256"):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "convert", str(src),
                               str(tmp_path / "o"), "--key-rank", "8", "-q"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o*"))
        for f in TOKENIZER_FILES:                      # second round: a foreign tokenizer
            if (default_model_dir / f).exists():
                shutil.copy(default_model_dir / f, src / f)


def test_cli_calibration_flags_reach_the_calibration(monkeypatch, tmp_path):
    """The --calib-* flags become the calibration settings convert() receives (the lr, batch,
    steps and positions of the shipped recipes are set this way)."""
    from model_patches.conversion import convert as convert_module
    from server.cli import main
    seen = {}

    def fake(src, dst, **kw):
        seen.update(kw)
        raise ConversionError("stop here")
    monkeypatch.setattr(convert_module, "convert", fake)
    with pytest.raises(SystemExit) as stop:
        main(["convert", str(tmp_path / "src"), str(tmp_path / "dst"), "--key-rank", "16",
              "--calibrate", "--calib-tokens", "65536", "--calib-steps", "800", "--calib-batch",
              "4", "--calib-lr", "3e-3", "--calib-pos-skip", "8192", "--e2e-steps", "40",
              "--e2e-lr", "2e-4", "--calib-long-steps", "100"])
    assert stop.value.code == 2
    assert seen["calibration"] == {"tokens": 65536, "steps": 800, "batch": 4, "lr": 3e-3,
                                   "pos_skip": 8192, "e2e_pos_skip": 8192, "e2e_steps": 40,
                                   "e2e_lr": 2e-4, "long_steps": 100}


def test_long_range_weights_mark_rows_that_attend_far_back(sources, tmp_path):
    """1 + s · (largest attention probability on one key >= distance back, sink excluded):
    rows with no such key weigh exactly 1, the rest lie in [1, 1 + s]; with it the layer-wise
    calibration still trains and reports the setting."""
    from model_patches.conversion.calibrate import long_range_weights
    m = TorchCausalLM.from_dir(sources["llama"])
    ids = torch.randint(0, m.w["model.embed_tokens.weight"].shape[0], (3, 40),
                        generator=torch.Generator().manual_seed(0))
    pos = torch.arange(40)
    n = m.attn_norm(1, m.embed(ids, pos))
    w = long_range_weights(m, 1, n, pos, strength=4.0, distance=8, chunk=2)
    probs = m.attention_probs(1, n, pos)
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs[..., 0]))
    assert w.shape == (3, 40) and torch.all(w[:, :9] == 1)          # rows 0..8: only the sink
    assert torch.all(w[:, 9:] > 1) and torch.all(w <= 5)
    expect = 1 + 4 * probs[1, :, 20, 1:13].max()                      # row 20: keys 1..12
    torch.testing.assert_close(w[1, 20], expect)
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 10, "batch": 4, "retrieval_weight": 4.0}
    s = convert(sources["llama"], tmp_path / "cal", key_rank=4, calibrate=True, calibration=cal,
                **SMALL)
    report = json.loads((s.dst / "config.json").read_text())["factored_keys"]["calibration"]
    assert report["retrieval_weight"] == 4.0 and report["retrieval_distance"] == 64
    assert all(x["relative_mse_after"] < x["relative_mse_before"] for x in report["layers"])


def _layer1_latent_setup(sources, tmp_path, seed):
    """(teacher, an r = 4 latent PCA init of the tiny llama, 4 random windows of 32 tokens,
    positions, layer 1's W_q / A / B names) for calibrate_layer checks."""
    init = convert(sources["llama"], tmp_path / "init", key_rank=4, keys="latent", **SMALL).dst
    ids = torch.randint(0, VOCAB, (4, 32), generator=torch.Generator().manual_seed(seed))
    p = "model.layers.1.self_attn"
    names = [f"{p}.q_proj.weight", f"{p}.k_proj.weight", f"{p}.k_up_proj.weight"]
    return TorchCausalLM.from_dir(sources["llama"]), init, ids, torch.arange(32), names


def test_key_proj_lr_scale_slows_only_the_latent_projection(sources, tmp_path):
    """key_proj_lr_scale = s: the layer-wise stage trains A (k_proj) at s x lr, W_q and B at
    lr: at s = 0 A stays at its PCA start exactly while W_q and B move; at s = 0.1 A moves,
    less than at s = 1."""
    teacher, init, ids, pos, names = _layer1_latent_setup(sources, tmp_path, seed=1)
    moved = {}
    for scale in (0.0, 0.1, 1.0):
        cfg, state = load_checkpoint(init)
        student = TorchCausalLM(cfg, state)
        x = student.embed(ids, pos).detach()
        opts = {"steps": 5, "batch": 2, "lr": 1e-2, "key_proj_lr_scale": scale}
        calibrate_layer(teacher, student, 1, x, pos, names, opts)
        moved[scale] = {n: (student.w[n].detach() - state[n].float()).abs().max().item()
                        for n in names}
    assert moved[0.0][names[1]] == 0.0
    assert moved[0.0][names[0]] > 0 and moved[0.0][names[2]] > 0
    assert 0 < moved[0.1][names[1]] < moved[1.0][names[1]]


def test_key_fidelity_holds_the_reconstructed_keys_near_the_source(sources, tmp_path):
    """key_fidelity = λ adds λ‖B A n − W_k n‖² / ‖W_k n‖² to the layer loss: after the same
    steps the student's pre-RoPE keys are closer to the source's with λ = 10 than with λ = 0;
    thin keys (another space than the source's keys) are refused in one line."""
    teacher, init, ids, pos, names = _layer1_latent_setup(sources, tmp_path, seed=2)
    err = {}
    for lam in (0.0, 10.0):
        student = TorchCausalLM(*load_checkpoint(init))
        x = student.embed(ids, pos).detach()
        calibrate_layer(teacher, student, 1, x, pos, names,
                        {"steps": 20, "batch": 2, "lr": 1e-2, "key_fidelity": lam})
        with torch.no_grad():
            n = student.attn_norm(1, x)
            want = teacher.pre_rope_keys(1, n)
            err[lam] = ((student.pre_rope_keys(1, n) - want).pow(2).mean()
                        / want.pow(2).mean()).item()
    assert err[10.0] < err[0.0]
    thin = convert(sources["llama"], tmp_path / "thin", key_rank=4, keys="thin", **SMALL).dst
    student = TorchCausalLM(*load_checkpoint(thin))
    with pytest.raises(ConversionError, match="key_fidelity needs full-width"):
        calibrate_layer(teacher, student, 1, student.embed(ids, pos).detach(), pos, names[:2],
                        {"steps": 1, "batch": 2, "lr": 1e-2, "key_fidelity": 1.0})


@pytest.mark.parametrize("keys", ["original", "latent", "thin"])
def test_attention_last_rows_is_the_tail_of_full_attention(sources, tmp_path, keys):
    """TorchCausalLM.attention_last_rows(i, n, pos, r) = attention(i, n, pos)[:, -r:], values
    and key-projection gradients alike, at shared and per-window (PoSE-like) positions."""
    src = sources["llama"]
    path = src if keys == "original" else convert(src, tmp_path / keys, key_rank=4, keys=keys,
                                                  **SMALL).dst
    m = TorchCausalLM.from_dir(path)
    kname = "model.layers.1.self_attn.k_proj.weight"
    (k_w,) = m.make_trainable([kname])
    n = torch.randn(2, 48, 64, generator=torch.Generator().manual_seed(5))
    for pos in (torch.arange(48), torch.cat([torch.arange(20), torch.arange(500, 528)]).repeat(2, 1)):
        full = m.attention(1, n, pos)[:, -16:]
        (g_full,) = torch.autograd.grad(full.square().sum(), k_w)
        tail = m.attention_last_rows(1, n, pos, 16)
        (g_tail,) = torch.autograd.grad(tail.square().sum(), k_w)
        torch.testing.assert_close(tail, full, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g_tail, g_full, rtol=1e-4, atol=1e-5)


def test_long_window_steps_lower_the_long_tail_error_and_are_reported(sources, tmp_path):
    """long_steps > 0: after each layer's short-window steps, steps on short batches plus the
    last long_tail rows of long windows (keys over the whole window, the student's own hidden
    states): every layer's tail error on the long windows falls, the short windows' error
    still falls, and the settings are in the checkpoint's calibration report."""
    long = {"long_steps": 8, "long_seq_len": 256, "long_tail": 32, "long_windows": 4,
            "long_batch": 2, "long_lr": 1e-3}
    cal = {"tokens": 8 * 64, "seq_len": 64, "steps": 10, "batch": 4, **long}
    s = convert(sources["llama"], tmp_path / "cal", key_rank=4, keys="latent", calibrate=True,
                calibration=cal, **SMALL)
    report = json.loads((s.dst / "config.json").read_text())["factored_keys"]["calibration"]
    assert {k: report[k] for k in long} == long
    for layer in report["layers"]:
        assert layer["long_tail_mse_after"] < layer["long_tail_mse_before"]
        assert layer["relative_mse_after"] < layer["relative_mse_before"]
