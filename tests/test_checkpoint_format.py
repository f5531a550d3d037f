"""Factored checkpoint validation: a malformed checkpoint fails with one line naming the field."""

from __future__ import annotations

import json

import pytest

from engine.checkpoint import FactoredCheckpointError, FactoredKeysConfig, validate_checkpoint_dir
from engine.kv_layout import KVLayout
from model_patches.conversion.checkpoint_writer import (ConversionError, write_full_rank,
                                               write_rotary_pair_subset)
from tests.engine_utils import tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def thin_llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return write_rotary_pair_subset(tiny_llama(root / "src"), root / "thin", 8)


def _edit(src, dst, fn):
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    fn(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _error(path) -> str:
    with pytest.raises(FactoredCheckpointError) as e:
        validate_checkpoint_dir(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_valid_checkpoint_roundtrip(thin_llama):
    fk = validate_checkpoint_dir(thin_llama)
    assert fk.ranks == (8, 8) and fk.head_dim == 32 and fk.inv_freq is not None
    cfg = json.loads((thin_llama / "config.json").read_text())
    again = FactoredKeysConfig.from_hf_config({**cfg, "factored_keys": fk.to_block()})
    assert again.ranks == fk.ranks and again.softmax_scale == fk.softmax_scale
    assert all((a == b).all() for a, b in zip(again.inv_freq, fk.inv_freq))
    kv = KVLayout.of_factored(fk, "fp16")
    assert kv.bytes_per_token * 64 == kv.baseline_bytes_per_token * 40


@pytest.mark.parametrize("field", ["key_rank", "head_dim", "rotary_inv_freq", "method",
                                   "format_version", "source_model"])
def test_missing_field_is_named(thin_llama, tmp_path, field):
    bad = _edit(thin_llama, tmp_path / "bad", lambda c: c["factored_keys"].pop(field))
    assert field in _error(bad)


def test_rank_inconsistent_with_weights(thin_llama, tmp_path):
    def bump(c):
        c["factored_keys"]["key_rank"] = 16
        c["factored_keys"]["rotary_inv_freq"] = [[[0.1] * 8] * 2] * 2
    msg = _error(_edit(thin_llama, tmp_path / "bad", bump))
    assert "q_proj.weight" in msg and "key_rank" in msg


@pytest.mark.parametrize("edit, needle", [
    (lambda c: c["factored_keys"].update(key_rank=7), "odd"),
    (lambda c: c["factored_keys"].update(key_rank=64), "key_rank"),
    (lambda c: c["factored_keys"].update(rotary_inv_freq=[[0.1] * 3] * 2), "rotary_inv_freq"),
    (lambda c: c["factored_keys"].update(rotary_inv_freq=[1.0, -1.0, 0.5, 0.1]), "rotary_inv_freq"),
    (lambda c: c["factored_keys"].update(head_dim=16), "head_dim"),
    (lambda c: c.update(architectures=["LlamaForCausalLM"]), "architectures"),
])
def test_bad_values(thin_llama, tmp_path, edit, needle):
    assert needle in _error(_edit(thin_llama, tmp_path / "bad", edit))


def test_missing_and_corrupt_weights(thin_llama, tmp_path):
    import shutil
    bad = tmp_path / "noweights"
    shutil.copytree(thin_llama, bad)
    (bad / "model.safetensors").unlink()
    assert "safetensors" in _error(bad)
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    assert "unreadable" in _error(bad)


def test_unfactored_model_passes_through(tmp_path):
    assert validate_checkpoint_dir(tiny_llama(tmp_path / "plain")) is None


def test_converter_rejects_bad_input(tmp_path):
    src = tiny_llama(tmp_path / "src")
    with pytest.raises(ConversionError, match="odd"):
        write_rotary_pair_subset(src, tmp_path / "o", 7)
    with pytest.raises(ConversionError, match="outside"):
        write_rotary_pair_subset(src, tmp_path / "o", 64)
    with pytest.raises(ConversionError, match="config.json"):
        write_full_rank(tmp_path / "nowhere", tmp_path / "o")
    assert not (tmp_path / "o").exists()
    # GPT-2 (no RoPE) accepts odd ranks
    write_rotary_pair_subset(tiny_gpt2(tmp_path / "g"), tmp_path / "g7", 7)
    assert validate_checkpoint_dir(tmp_path / "g7").ranks == (7, 7)


@pytest.fixture(scope="module")
def latent_llama(tmp_path_factory):
    from tests.engine_utils import write_latent
    root = tmp_path_factory.mktemp("latent-ckpt")
    return write_latent(tiny_llama(root / "src"), root / "latent", 8, 1)


def test_latent_checkpoint_roundtrip_and_old_blocks_read_as_thin(latent_llama, thin_llama):
    fk = validate_checkpoint_dir(latent_llama)
    assert (fk.key_mode, fk.latent_groups, fk.ranks) == ("latent", 1, (8, 8))
    assert fk.query_dims(0) == 32 and fk.latent_dims(0) == 16
    assert fk.inv_freq[0].shape == (2, 16)                    # full-width table per KV head
    cfg = json.loads((latent_llama / "config.json").read_text())
    again = FactoredKeysConfig.from_hf_config({**cfg, "factored_keys": fk.to_block()})
    assert again.to_block() == fk.to_block() == cfg["factored_keys"]
    assert KVLayout.of_factored(fk, "fp16").bytes_per_token == \
        KVLayout.of_factored(validate_checkpoint_dir(thin_llama), "fp16").bytes_per_token
    thin_block = json.loads((thin_llama / "config.json").read_text())["factored_keys"]
    assert "key_mode" not in thin_block                       # thin blocks are written as before
    assert validate_checkpoint_dir(thin_llama).key_mode == "thin"


@pytest.mark.parametrize("edit, needle", [
    (lambda b: b.update(key_mode="fancy"), "key_mode"),
    (lambda b: b.update(latent_groups=3), "latent_groups"),
    (lambda b: b.update(rotary_inv_freq=[[[0.1] * 4] * 2] * 2), "expected [2, 16]"),
])
def test_bad_latent_blocks(latent_llama, tmp_path, edit, needle):
    assert needle in _error(_edit(latent_llama, tmp_path / "bad",
                                  lambda c: edit(c["factored_keys"])))


def test_latent_checkpoint_without_its_up_projection(latent_llama, tmp_path):
    from safetensors.torch import load_file, save_file
    bad = _edit(latent_llama, tmp_path / "bad", lambda c: None)
    st = load_file(bad / "model.safetensors")
    del st["model.layers.1.self_attn.k_up_proj.weight"]
    save_file(st, bad / "model.safetensors")
    assert "k_up_proj.weight is missing" in _error(bad)
