"""KV head merging (`factorkv convert --kv-heads N`, model_patches/conversion/head_merge.py).

* exactness: a tiny Llama whose KV heads are exact combinations of N heads (keys: a complex
  scalar per rotary frequency, i.e. RoPE-commuting; values: any D×D matrix) merged to N
  reproduces its logits; the real (non-commuting) key merge does not, unless the scalars are
  real;
* the merged checkpoint is a plain LlamaForCausalLM that stock vLLM (plugins disabled)
  serves over HTTP, with 2× the KV tokens in the same memory and the source's greedy text;
* --kv-heads with --key-rank: a factored checkpoint of the merged model that the FactorKV
  engine loads and decodes like the plain-torch reference;
* bad arguments: one line, exit status 2, nothing at DST.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch

from model_patches.conversion.convert import convert
from model_patches.conversion.checkpoint_writer import ConversionError
from model_patches.conversion.head_merge import groups, merge_kv_heads
from model_patches.text_sets import token_stream
from tests.engine_utils import ROOT

VOCAB = 49152          # the default model's tokenizer, so the converter reads real text
SMALL = dict(stat_tokens=2 * 512, progress=False)
IDS = torch.randint(100, VOCAB, (1, 48), generator=torch.Generator().manual_seed(3))


def structured_llama(path, default_model_dir, *, heads=8, kv_heads=8, n=2, hidden=64,
                     bias=False, phases=True, seed=0):
    """A tiny Llama whose KV heads are exact combinations of n base heads: in group g (the
    source heads that new head g of groups() replaces; here every group is built from its
    first head), key head a = base key times a complex scalar per rotary frequency (a real
    one if not `phases`), value head a = M_a · base value (random D×D M_a); biases alike."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=heads, num_key_value_heads=kv_heads, attention_bias=bias,
        max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
        eos_token_id=2)).eval()
    d = hidden // heads
    half = d // 2
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            a.q_proj.weight.mul_(4)                       # peakier attention: more telling
            a.k_proj.weight.mul_(4)
            wk, wv = a.k_proj.weight.view(kv_heads, d, hidden), a.v_proj.weight.view(kv_heads, d, hidden)
            bk = a.k_proj.bias.view(kv_heads, d).normal_() if bias else None
            bv = a.v_proj.bias.view(kv_heads, d).normal_() if bias else None
            for grp in groups(heads, kv_heads, n):
                base = grp[0]
                for h in grp[1:]:
                    angle = torch.rand(half) * 6.28 if phases else torch.zeros(half)
                    alpha = torch.polar(0.5 + torch.rand(half), angle)
                    z = torch.complex(wk[base, :half], wk[base, half:]) * alpha[:, None]
                    wk[h] = torch.cat((z.real, z.imag))
                    m = torch.randn(d, d) / d ** 0.5
                    wv[h] = m @ wv[base]
                    if bias:
                        zb = torch.complex(bk[base, :half], bk[base, half:]) * alpha
                        bk[h], bv[h] = torch.cat((zb.real, zb.imag)), m @ bv[base]
    model.save_pretrained(path)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / f).exists():
            shutil.copy(default_model_dir / f, path / f)
    return path


def _logits(path, ids=IDS):
    from transformers import AutoModelForCausalLM
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(str(path)).eval()(ids).logits[0]


@pytest.mark.parametrize("heads, kv_heads, n, bias, hidden", [
    (8, 8, 2, False, 64),       # MHA -> GQA, 4 source heads per merged head
    (8, 8, 2, True, 64),        # with q/k/v/o biases
    (8, 8, 1, False, 64),       # MHA -> MQA
    (12, 4, 3, False, 96),      # N does not divide H_kv: overlapping groups
])
def test_merging_exact_combinations_reproduces_logits(default_model_dir, tmp_path, heads,
                                                      kv_heads, n, bias, hidden):
    # overlapping groups are exact only if every source head shares one base: build with n=1
    src = structured_llama(tmp_path / "src", default_model_dir, heads=heads, kv_heads=kv_heads,
                           n=n if kv_heads % n == 0 else 1, bias=bias, hidden=hidden)
    s = merge_kv_heads(src, tmp_path / "merged", n, **SMALL)
    cfg = json.loads((s.dst / "config.json").read_text())
    assert cfg["num_key_value_heads"] == n and cfg["architectures"] == ["LlamaForCausalLM"]
    assert s.kv_bytes_per_token * kv_heads == s.baseline_kv_bytes_per_token * n
    ref = _logits(src)
    diff = (_logits(s.dst) - ref).abs().max().item()
    assert diff < 1e-4, diff
    assert ref.abs().max() > 0.3                          # not trivially small logits


def test_real_key_merge_is_exact_only_for_real_scalars(default_model_dir, tmp_path):
    """The per-dimension real PCA does not commute with RoPE: complex phases between heads
    break it (the complex merge of the same model is exact, test above); real scalars don't."""
    for phases, exact in ((True, False), (False, True)):
        src = structured_llama(tmp_path / f"src{phases}", default_model_dir, phases=phases)
        dst = merge_kv_heads(src, tmp_path / f"real{phases}", 2, merge_keys="real", **SMALL).dst
        diff = (_logits(dst) - _logits(src)).abs().max().item()
        assert (diff < 1e-4) == exact, (phases, diff)


def test_recovery_trains_merged_attention_toward_source(default_model_dir, tmp_path):
    """A random tiny MHA model (no structure: merging loses information); --recover lowers
    every layer's attention-output error and brings the logits closer to the source's; its
    end-to-end stage (--e2e-steps) brings them closer still on held-out text."""
    src = structured_llama(tmp_path / "src", default_model_dir, n=8)     # 8 groups of 1: random
    rec = {"tokens": 8 * 64, "seq_len": 64, "steps": 40, "batch": 4}
    plain = merge_kv_heads(src, tmp_path / "plain", 2, **SMALL).dst
    s = merge_kv_heads(src, tmp_path / "rec", 2, recover=rec, **SMALL)
    report = json.loads((s.dst / "config.json").read_text())["kv_head_merge"]["recovery"]
    assert "recovery" in s.lines()[1] and len(report["layers"]) == 2
    assert all(x["relative_mse_after"] < x["relative_mse_before"] for x in report["layers"])

    def kl(path, ids=IDS):
        """KL(source || path) of the next-token distributions on ids."""
        return torch.nn.functional.kl_div(torch.log_softmax(_logits(path, ids), -1),
                                          torch.log_softmax(_logits(src, ids), -1),
                                          log_target=True, reduction="batchmean").item()
    assert kl(s.dst) < kl(plain)
    # then end to end: KL(source || merged) on calibration text, over q/k/v/o of every layer;
    # after a nearly untrained layer-wise stage (1 step) so that the pass has work to do
    weak = {**rec, "steps": 1}
    lw = merge_kv_heads(src, tmp_path / "rec-1", 2, recover=weak, **SMALL)
    e2e = merge_kv_heads(src, tmp_path / "rec-e2e", 2, **SMALL,
                         recover={**weak, "e2e_steps": 30, "e2e_seq_len": 64, "e2e_batch": 4,
                                  "e2e_lr": 1e-3})
    rep = json.loads((e2e.dst / "config.json").read_text())["kv_head_merge"]["recovery"]
    assert rep["e2e"]["steps"] == 30 and "q_proj/k_proj/v_proj/o_proj" in rep["e2e"]["recipe"]
    from transformers import AutoTokenizer
    held_out = torch.tensor(token_stream(AutoTokenizer.from_pretrained(str(src)),
                                         "evaluation")[:256])[None]
    assert kl(e2e.dst, held_out) < 0.5 * kl(lw.dst, held_out)    # measured 0.24x
    assert not (tmp_path / ".rec-e2e.calib").exists()   # its saved progress is cleaned up


@pytest.mark.slow
def test_merged_model_served_by_stock_vllm(default_model_dir, tmp_path):
    """`factorkv convert --kv-heads 2` of a tiny MHA model (exact structure, head_dim 32 for
    vLLM's CPU attention), served by `factorkv serve` with vLLM's plugins disabled
    (VLLM_PLUGINS=''), so the stock LlamaForCausalLM serves it: it answers over HTTP with the
    SOURCE model's greedy text and holds 2x the KV tokens of the source in the same memory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests._server import running_server
    src = structured_llama(tmp_path / "src", default_model_dir, heads=4, kv_heads=4, n=2,
                           hidden=128)
    dst = tmp_path / "kv2"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "convert", str(src), str(dst),
                           "--kv-heads", "2", "--stat-tokens", "1024", "-q"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "KV heads 4 -> 2" in proc.stdout and "2.00x" in proc.stdout, proc.stdout
    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(str(src))
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    expected = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    mem = 16 << 20
    with running_server("--model", str(dst), "--kv-cache-memory", str(mem), "--max-model-len",
                        "512", env={"VLLM_PLUGINS": ""}) as srv:
        info = srv.get_json("/factorkv/info")
        assert info["architectures"] == ["LlamaForCausalLM"] and info["factored_keys"] is None
        r = srv.post("/v1/completions", {"model": info["served_model_name"], "prompt": prompt,
                                         "max_tokens": 8, "min_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        chat = srv.openai_client().chat.completions.create(
            model=info["served_model_name"], max_tokens=4, temperature=0,
            messages=[{"role": "user", "content": "Hello!"}])
    assert text == expected, (text, expected)
    assert chat.usage.completion_tokens >= 1
    # 2 layers · 2 KV heads · (32 + 32) fp32 values per token (the source: 4 KV heads)
    per_token = 2 * 2 * 64 * 4
    kv = info["kv_cache"]
    assert abs(kv["size_tokens"] - mem // per_token) <= kv["block_size"], kv


@pytest.mark.slow
def test_merge_then_factor_loads_in_factorkv_engine(default_model_dir, tmp_path):
    from engine.torch_model import TorchCausalLM
    from tests.engine_utils import run_vllm
    src = structured_llama(tmp_path / "src", default_model_dir, heads=4, kv_heads=4, n=2,
                           hidden=128)
    s = convert(src, tmp_path / "kv2-r8", kv_heads=2, key_rank=8, **SMALL)
    cfg = json.loads((s.dst / "config.json").read_text())
    fk = cfg["factored_keys"]
    assert cfg["architectures"] == ["FactoredLlamaForCausalLM"] and cfg["num_key_value_heads"] == 2
    assert fk["key_rank"] == 8 and fk["method"].startswith("kv-merge-complex+")
    assert fk["source_model"] == src.name and not list(tmp_path.glob(".kv2-r8*"))
    # fp16 bytes per token: 2 layers · H_kv · (r + D) · 2, from 4 · (32 + 32) to 2 · (8 + 32)
    assert (s.baseline_kv_bytes_per_token, s.kv_bytes_per_token) == (2 * 4 * 64 * 2, 2 * 2 * 40 * 2)
    assert any("KV heads 4 -> 2" in line for line in s.lines())
    prompt = IDS[0, :30].tolist()
    mem = 8 << 20
    out = run_vllm(s.dst, [[{"prompt": prompt, "max_tokens": 8}]], tmp_path,
                   kv_cache_memory_bytes=mem, block_size=16)
    got = out["rounds"][0][0]["tokens"]
    ref = TorchCausalLM.from_dir(s.dst)(torch.tensor(prompt + got))
    assert got == ref[len(prompt) - 1:-1].argmax(-1).tolist()
    assert abs(out["kv_cache_tokens"] - mem // (2 * 2 * 40 * 4)) <= 16


@pytest.mark.parametrize("args, needle", [
    (["--kv-heads", "3"], "does not divide the 8 query heads"),
    (["--kv-heads", "8", "--key-rank", "4"], "less than the source's 8 KV heads"),
])
def test_bad_kv_heads_one_line_exit_2(default_model_dir, tmp_path, args, needle):
    src = structured_llama(tmp_path / "src", default_model_dir)
    dst = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "server.cli", "convert", str(src), str(dst),
                           *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, lines
    assert lines[0].startswith("factorkv: error:")
    assert not dst.exists() and not list(tmp_path.glob(".out*"))


def test_bad_kv_heads_in_process(default_model_dir, tmp_path, capsys):
    from transformers import GPT2Config, GPT2LMHeadModel
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=32, n_layer=1, n_head=4)).save_pretrained(gpt2)
    with pytest.raises(ConversionError, match="Llama-family"):
        convert(gpt2, tmp_path / "o1", kv_heads=2, **SMALL)
    src = structured_llama(tmp_path / "src", default_model_dir)
    for kw, needle in (({"kv_heads": 0}, "at least 1"), ({"kv_heads": -2}, "at least 1"),
                       ({"kv_heads": 9}, "less than"),
                       ({"kv_heads": 2, "key_rank": 5, "keys": "thin"}, "odd"),
                       ({"kv_heads": 2, "key_rank": 16}, "outside")):
        with pytest.raises(ConversionError, match=needle):
            convert(src, tmp_path / "o0", **kw, **SMALL)
    with pytest.raises(ConversionError, match="needs --key-rank"):
        convert(src, tmp_path / "o2", kv_heads=2, calibrate=True, **SMALL)
    with pytest.raises(ConversionError, match="--merge-keys"):
        convert(src, tmp_path / "o3", kv_heads=2, merge_keys="imaginary", **SMALL)
    with pytest.raises(ConversionError, match="give --key-rank, --key-cache-ratio or --kv-heads"):
        convert(src, tmp_path / "o4", **SMALL)
    with pytest.raises(ConversionError, match="--recover .* needs --kv-heads"):
        convert(src, tmp_path / "o5", key_rank=4, recover={}, **SMALL)
    from server.cli import main
    capsys.readouterr()                                   # (save_pretrained's progress bars)
    for args, needle in ((["--key-rank", "4", "--recover"], "needs --kv-heads"),
                         (["--kv-heads", "2", "--recover", "--learn-freq"], "need --calibrate")):
        with pytest.raises(SystemExit) as e:
            main(["convert", str(src), str(tmp_path / "o6"), *args, "-q"])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and needle in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2", "src"]


def test_quality_variant_names_and_pareto_report(default_model_dir, tmp_path, monkeypatch):
    """`factorkv eval` builds merge-* variants with convert(); the report has the KV bytes vs
    perplexity table (Pareto front starred) and writes the plot next to it."""
    from model_patches.evaluation.quality import report as R
    from model_patches.evaluation.quality import variants as V
    assert V.parse_variant("original") == {}
    assert V.parse_variant("cal-r16") == {"calibrate": True, "key_rank": 16, "keys": "thin"}
    assert V.parse_variant("latent-init-r16") == {"calibrate": False, "key_rank": 16,
                                                  "keys": "latent"}
    assert V.parse_variant("latent3-cal-r8") == {"calibrate": True, "key_rank": 8,
                                                 "keys": "latent", "latent_groups": 3}
    assert V.parse_variant("merge-kv1") == {"kv_heads": 1}
    assert V.parse_variant("merge-kv1-real") == {"kv_heads": 1, "merge_keys": "real"}
    assert V.parse_variant("merge-kv1-r32") == {"kv_heads": 1, "key_rank": 32, "keys": "thin"}
    assert V.parse_variant("merge-kv2-real-cal-r8") == {"kv_heads": 2, "merge_keys": "real",
                                                        "calibrate": True, "key_rank": 8,
                                                        "keys": "thin"}
    assert V.parse_variant("merge-kv1-rec-cal-r32") == {"kv_heads": 1, "recover": {},
                                                        "calibrate": True, "key_rank": 32,
                                                        "keys": "thin"}
    assert V.parse_variant("merge-kv1-rec150-r16") == {"kv_heads": 1, "key_rank": 16,
                                                       "recover": {"e2e_steps": 150},
                                                       "keys": "thin"}
    for name, base in (("merge-kv1-rec150-cal-r32", "merge-kv1-rec150"),
                       ("merge-kv2-real-rec-r8", "merge-kv2-real-rec"),
                       ("merge-kv1-r32", "merge-kv1")):
        assert V.merged_name(V.parse_variant(name)) == base
    for bad in ("merge", "merge-kv", "merge-kv1-imag", "merge-kv1-r", "cal-16", "bogus",
                "merge-kv1-cal", "merge-kv1-rec-real", "latent-r16", "latentx-init-r16"):
        assert V.parse_variant(bad) is None, bad
    assert R.pareto_front([(3, 10.0), (1, 30.0), (2, 12.0), (2, 40.0), (3, 11.0)]) == [1, 2, 0]

    src = structured_llama(tmp_path / "src", default_model_dir, heads=4, kv_heads=4, n=2)
    root = tmp_path / "work"
    merged = V.resolve_variant("merge-kv2", root, src, {}, progress=False)
    assert json.loads((merged / "config.json").read_text())["num_key_value_heads"] == 2
    # merged then factored: built from the cached merged variant (not merged again)
    import model_patches.conversion.head_merge as HM

    def no_merge(*a, **k):
        raise AssertionError("merge-kv2-r4 merged the source again")
    monkeypatch.setattr(HM, "merge_kv_heads", no_merge)
    both = V.resolve_variant("merge-kv2-r4", root, src, {}, progress=False)
    cfg = json.loads((both / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["factored_keys"]["key_rank"] == 4
    assert R.ckpt_info(both)["method"] == "kv-merge-complex+partial-rope"
    assert sorted(p.name for p in (root / "models").iterdir()) == ["merge-kv2", "merge-kv2-r4"]
    thin = convert(src, tmp_path / "r4", key_rank=4, keys="thin", **SMALL).dst
    ppl = lambda v: {"ppl": v, "tokens_scored": 63, "seconds": 1.0}   # noqa: E731
    metrics = {"original": {"ppl/ctx64/tokens64": ppl(10.0)},
               "merge-kv2": {"ppl/ctx64/tokens64": ppl(10.5)},
               "init-r4": {"ppl/ctx64/tokens64": ppl(12.0)}}
    opts = {"contexts": [64], "eval_tokens": 64, "vllm_variant": None, "vllm_ctx": 64,
            "passkey_n": {}, "passkey_lengths": [], "seed": 0}
    out = tmp_path / "docs" / "q.md"
    R.write_report(out, ["original", "merge-kv2", "init-r4"],
                   {"original": src, "merge-kv2": merged, "init-r4": thin}, metrics, opts,
                   "factorkv eval", 1.0)
    text = out.read_text()
    # fp16 bytes per token, 2 layers: 4·(16+16)·2·2 = 512; merged 256; r = 4: 4·(4+16)·2·2 = 320
    assert "| original | original | 4 | 16 | 512 | 1.000 (1.00x fewer) | 10.000 | – | ★ |" in text
    assert "| merge-kv2 | kv-merge-complex | 2 | 16 | 256 | 0.500 (2.00x fewer) | 10.500 | +5.0% | ★ |" in text
    assert "| init-r4 | partial-rope | 4 | 4 | 320 | 0.625 (1.60x fewer) | 12.000 | +20.0% |  |" in text
    png = out.parent / R.PARETO_PNG.format(stem=out.stem)
    assert png.name == "q-pareto.png"                  # one plot per report, none overwritten
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png.name})" in text
