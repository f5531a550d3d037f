"""The calibrated factored build of the default model: built from the shipped artifact
(hash-checked), idempotent, exportable byte for byte, and a usable model."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model_patches.conversion import default_variants as dv
from model_patches.conversion.default_model import MODEL_NAME, DefaultModelError


@pytest.fixture()
def cache_with_original(default_model_dir, tmp_path):
    """A fresh cache root whose original model is the session's prepared one (symlink)."""
    (tmp_path / "models").mkdir()
    os.symlink(default_model_dir, tmp_path / "models" / MODEL_NAME)
    return tmp_path


def test_variants_listed():
    assert dv.available_variants()[0] == dv.ORIGINAL
    assert dv.DEFAULT_VARIANT in dv.available_variants() and "thin-r32" in dv.available_variants()
    with pytest.raises(DefaultModelError, match="thin-r3"):
        dv.prepare_variant("thin-r3")
    with pytest.raises(DefaultModelError, match="unknown"):
        dv.variant_dir("r16")
    assert dv.parse_variant_name("latent-r16") == ("latent", 16)
    assert dv.parse_variant_name("thin-16") is None and dv.parse_variant_name("fat-r16") is None


def test_build_swaps_only_the_factored_weights(default_model_dir, cache_with_original):
    out = dv.prepare_variant(dv.DEFAULT_VARIANT, cache_with_original, quiet=True)
    assert out == dv.variant_dir(dv.DEFAULT_VARIANT, cache_with_original)
    weights, manifest = dv.artifact_paths(dv.DEFAULT_VARIANT)
    man = json.loads(manifest.read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["FactoredLlamaForCausalLM"]
    assert cfg["factored_keys"] == man["factored_keys"]
    built, orig, thin = (load_file(str(out / "model.safetensors")),
                         load_file(str(default_model_dir / "model.safetensors")), load_file(str(weights)))
    assert set(built) == set(orig) | set(thin)               # latent keys add k_up_proj
    for k, v in built.items():
        want = thin[k].float() if k in thin else orig[k]
        assert torch.equal(v, want), k
    latent = cfg["factored_keys"].get("key_mode") == "latent"
    assert len(thin) == (3 if latent else 2) * cfg["num_hidden_layers"]
    for f in ("tokenizer.json", "chat_template.jinja"):
        assert (out / f).read_bytes() == (default_model_dir / f).read_bytes()
    # idempotent: a second call reads the marker and rewrites nothing
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    assert dv.prepare_variant(dv.DEFAULT_VARIANT, cache_with_original, quiet=True) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_tampered_artifact_is_refused(cache_with_original, tmp_path, monkeypatch):
    art = tmp_path / "artifacts"
    shutil.copytree(dv.ARTIFACT_DIR, art)
    weights = art / dv.artifact_paths("thin-r16")[0].name
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    monkeypatch.setattr(dv, "ARTIFACT_DIR", art)
    with pytest.raises(DefaultModelError, match="sha256"):
        dv.prepare_variant("thin-r16", cache_with_original, quiet=True)
    assert not dv.variant_dir("thin-r16", cache_with_original).exists()


def test_export_reproduces_the_artifact(default_variant_dir, tmp_path, monkeypatch):
    """Exporting the built checkpoint gives the shipped file again, byte for byte."""
    shipped = dv.artifact_paths(dv.DEFAULT_VARIANT)
    monkeypatch.setattr(dv, "ARTIFACT_DIR", tmp_path)
    path = dv.export_artifact(default_variant_dir)
    assert path.read_bytes() == shipped[0].read_bytes()
    assert json.loads(dv.artifact_paths(dv.DEFAULT_VARIANT)[1].read_text())["sha256"] == \
        json.loads(shipped[1].read_text())["sha256"]


@pytest.mark.slow
def test_default_variant_is_a_usable_model(default_model_dir, default_variant_dir):
    """A guard, not the benchmark (docs/results/quality.md): perplexity on 4 x 512 held-out
    tokens within 2x the original's, and a sensible chat answer."""
    from transformers import AutoTokenizer

    from engine.torch_model import TorchCausalLM
    from model_patches.evaluation.tasks import eval_windows, greedy_chat, perplexity
    from model_patches.text_sets import token_stream

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    windows = eval_windows(token_stream(tok, "evaluation"), 512, 4 * 512)
    ppl = {name: perplexity(TorchCausalLM.from_dir(path).eval(), windows)["ppl"]
           for name, path in (("original", default_model_dir), ("thin", default_variant_dir))}
    assert ppl["thin"] < 2 * ppl["original"], ppl
    answer = greedy_chat(TorchCausalLM.from_dir(default_variant_dir).eval(), tok,
                         prompts=("What is the capital of France?",), max_new=12)[0]["answer"]
    assert "Paris" in answer, answer
