"""KV memory metrics: the arithmetic, the capacity calculator, and the live gauges
against the engine's own numbers (tiny factored model, its unfactored source, and the
shared default server)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest

from engine.kv_layout import KVCapacity, KVLayout, kv_layout, users_at_context
from tests._robustness import wait_idle
from tests.engine_utils import ROOT

VOCAB = 49152  # the default model's tokenizer, so the tiny models can be served over HTTP


# ----------------------------------------------------------------- arithmetic (fast)

def test_layout_bytes_per_token_factored_and_plain():
    plain = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "hidden_size": 576}
    lay = kv_layout(plain, "float32")
    assert lay.bytes_per_token == 30 * 3 * 2 * 64 * 4 == lay.baseline_bytes_per_token
    assert lay.key_cache_cut == 0 and not lay.factored
    thin = lay.with_key_rank(16)
    assert thin.bytes_per_token == 30 * 3 * (16 + 64) * 4
    assert thin.key_cache_cut == 0.75
    # a per-layer factored block is read through engine.checkpoint
    fk = dict(plain, architectures=["FactoredLlamaForCausalLM"], factored_keys={
        "format_version": 1, "key_rank": [16] * 15 + [32] * 15, "head_dim": 64,
        "rotary_inv_freq": None, "method": "test", "source_model": "x"})
    lay2 = kv_layout(fk, "fp16")
    assert lay2.factored and lay2.bytes_per_token == 3 * 2 * (15 * 80 + 15 * 96)


def test_capacity_fills_memory_like_vllm_and_gain_is_2d_over_r_plus_d():
    lay = KVLayout(30, 3, 64, (64,) * 30, 4, False)
    budget = 256 << 20
    base = KVCapacity.from_memory(lay, budget, 128)
    thin = KVCapacity.from_memory(lay.with_key_rank(16), budget, 128)
    assert base.num_blocks == budget // (30 * 3 * 128 * 4 * 128) == 45   # stock vLLM: 5760 tokens
    assert thin.num_blocks == 72 and thin.capacity_tokens == 9216        # DESIGN.md: 1.600x
    assert thin.baseline_num_blocks == 45                                # same budget
    assert thin.concurrency_gain(2048) == pytest.approx(72 / thin.baseline_num_blocks)
    assert users_at_context(72, 128, 2048) == 72 / 16
    assert thin.bytes_per_user(2000) == 16 * 128 * 30 * 3 * 80 * 4       # whole blocks


def _capacity(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", "capacity", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_capacity_cli_paper_claim_and_gqa():
    """7B MHA at 128K, fp16: r = D/4 saves 24 GiB (25.8 GB) per user and fits 1.6x the users;
    with GQA (8 KV heads) the relative gain is the same but the saving is 4x smaller."""
    mha = json.loads(_capacity("--model", "llama-2-7b", "--context", "131072", "--json",
                               "--key-rank", "32").stdout)["rows"]
    assert mha[0]["bytes_per_user"] == 64 * 2**30
    assert mha[1]["saved_per_user"] == 24 * 2**30 and mha[1]["gain"] == pytest.approx(1.6, abs=0.01)
    gqa = json.loads(_capacity("--model", "mistral-7b", "--context", "131072", "--json",
                               "--key-rank", "32", "--kv-dtype", "fp8").stdout)["rows"]
    assert gqa[0]["bytes_per_user"] == 8 * 2**30 and gqa[1]["saved_per_user"] == 3 * 2**30
    table = _capacity("--model", "smollm2-135m", "--context", "2048", "--gpu-memory", "24GiB")
    assert table.returncode == 0 and "factored r=16" in table.stdout and "1.60x" in table.stdout


def test_capacity_cli_bad_input_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    for args in (["--model", "no-such-model"], ["--model", str(tmp_path)],
                 ["--model", "mistral-7b", "--key-rank", "999"],
                 ["--model", "mistral-7b", "--context", "0"],
                 ["--model", "mistral-7b", "--gpu-memory", "1GiB"],
                 ["--model", "mistral-7b", "--kv-dtype", "int3"]):
        proc = _capacity(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.startswith("factorkv: error:") and len(proc.stderr.splitlines()) == 1, proc.stderr


# ----------------------------------------------------------------- live server (slow)

def _gauges(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name: s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name.startswith("factorkv_")}


def _check_report_matches_engine(srv, budget: int, max_len: int) -> dict:
    """Every gauge equals the engine's own numbers; /v1/kv-cache and /metrics agree."""
    rep = srv.get_json("/v1/kv-cache")
    eng = srv.get_json("/factorkv/info")["kv_cache"]          # cache_config of the engine
    block_bytes = rep["bytes_per_token"] * rep["block_size"]
    assert rep["num_blocks"] == eng["num_blocks"]
    assert rep["block_size"] == eng["block_size"]
    # vLLM sizes the pool as budget // bytes per block: our bytes/token is the engine's
    assert eng["num_blocks"] == budget // block_bytes
    assert rep["memory_bytes"] == eng["num_blocks"] * block_bytes <= budget
    assert rep["capacity_tokens"] == eng["num_blocks"] * eng["block_size"]
    if max_len % eng["block_size"] == 0:
        assert rep["capacity_tokens"] == eng["size_tokens"]   # vLLM's "KV cache size: N tokens"
        assert rep["max_users_at_context"] == pytest.approx(eng["max_concurrency"])
    g = _gauges(srv.get("/metrics").text)
    rep = srv.get_json("/v1/kv-cache")
    assert g["factorkv_kv_bytes_per_token"] == rep["bytes_per_token"]
    assert g["factorkv_baseline_kv_bytes_per_token"] == rep["baseline_bytes_per_token"]
    assert g["factorkv_kv_capacity_tokens"] == rep["capacity_tokens"]
    assert g["factorkv_kv_bytes_per_user_max_context"] == rep["bytes_per_user_max_context"]
    assert g["factorkv_max_users_at_context"] == pytest.approx(rep["max_users_at_context"])
    assert g["factorkv_baseline_max_users_at_context"] == pytest.approx(rep["baseline_max_users_at_context"])
    assert g["factorkv_concurrency_gain"] == pytest.approx(rep["concurrency_gain"])
    assert g["factorkv_running_users"] == rep["live"]["running_users"] == 0
    assert g["factorkv_kv_usage_ratio"] == rep["live"]["kv_usage_ratio"] == 0
    assert "factorkv: KV cache" in srv.log_text()               # the start-up line
    return rep


@pytest.fixture(scope="module")
def tiny_pair(default_model_dir, tmp_path_factory):
    """A tiny random Llama (GQA, RoPE, served with the default tokenizer) and its r = D/4
    factored checkpoint."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_patches.conversion.checkpoint_writer import write_rotary_pair_subset

    root = tmp_path_factory.mktemp("kvm")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).save_pretrained(root / "src")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / f).exists():
            shutil.copy(default_model_dir / f, root / "src" / f)
    write_rotary_pair_subset(root / "src", root / "thin", 8)     # head_dim 32 -> r = 8
    return root / "src", root / "thin"


@pytest.mark.slow
def test_tiny_model_gauges_equal_engine_numbers(tiny_pair):
    from tests._server import running_server

    src, thin = tiny_pair
    budget, max_len = 3 << 20, 512
    args = ("--kv-cache-memory", str(budget), "--max-model-len", str(max_len),
            "--disable-uvicorn-access-log")
    with running_server("--model", str(thin), *args) as srv:
        rep = _check_report_matches_engine(srv, budget, max_len)
        assert rep["factored"] and rep["key_dims"] == 8
        assert rep["bytes_per_token"] == 2 * 2 * (8 + 32) * 4
        assert rep["baseline_bytes_per_token"] == 2 * 2 * 64 * 4
        custom = srv.get_json("/v1/kv-cache?context=300")
        assert custom["context_tokens"] == 300
        assert custom["max_users_at_context"] == pytest.approx(rep["num_blocks"] / 3)  # 3 blocks of 128
        assert srv.get("/v1/kv-cache?context=0").status_code == 400 or \
            srv.get("/v1/kv-cache?context=0").status_code == 422
    # The baseline the gauges predicted is what stock vLLM allocates for the source model.
    with running_server("--model", str(src), *args) as base:
        brep = _check_report_matches_engine(base, budget, max_len)
        assert not brep["factored"] and brep["concurrency_gain"] == 1.0
    assert brep["num_blocks"] == rep["baseline_capacity_tokens"] // rep["block_size"]
    assert rep["concurrency_gain"] == pytest.approx(rep["num_blocks"] / brep["num_blocks"])
    assert rep["concurrency_gain"] == pytest.approx(2 * 32 / (8 + 32), abs=0.05)


@pytest.mark.slow
def test_default_server_live_usage_per_user(default_server):
    """While one streaming request runs, the live gauges show it and its KV bytes; after it
    ends they return to zero."""
    srv = default_server
    rep = _check_report_matches_engine(srv, 256 << 20, 2048)
    # the README path serves the calibrated r = 16 build: 30 layers x 3 KV heads x (16 + 64) fp32
    assert rep["factored"] and rep["bytes_per_token"] == 30 * 3 * (16 + 64) * 4
    assert rep["baseline_bytes_per_token"] == 30 * 3 * 128 * 4
    assert rep["concurrency_gain"] == pytest.approx(1.6, abs=0.01)
    wait_idle(srv, timeout=120)          # earlier tests on the shared server must have drained
    client = srv.openai_client()
    prompt = "Tell me a long story about a lighthouse keeper. " * 20
    seen: dict = {}
    samples: list[dict] = []
    started, done = threading.Event(), threading.Event()
    chunks: list[int] = []
    errors: list[BaseException] = []

    def stream():
        # long enough to outlast the polling on a slow, shared machine (CI once streamed all
        # of a 120-token answer during one poll); closed as soon as the gauges have shown it
        try:
            with client.completions.create(
                    model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=1500, stream=True,
                    extra_body={"ignore_eos": True}) as response:
                for i, _ in enumerate(response):
                    chunks.append(i)
                    if i == 2:
                        started.set()
                    if done.is_set():
                        break
        except BaseException as e:  # surfaced in the assertion message below
            errors.append(e)
        started.set()

    t = threading.Thread(target=stream, daemon=True)
    t.start()
    assert started.wait(120) and not errors, errors
    deadline = time.time() + 120
    while time.time() < deadline and not seen and t.is_alive():
        live = srv.get_json("/v1/kv-cache")["live"]
        samples.append(live)
        if live["running_users"] >= 1 and live["kv_usage_ratio"] > 0:
            seen = live
        time.sleep(0.05)
    done.set()
    t.join(120)
    assert seen, (f"the running request never showed in /v1/kv-cache: {len(samples)} polls, "
                  f"last {samples[-1:]}, {len(chunks)} chunks streamed, errors {errors}")
    assert seen["bytes_per_user_mean_context"] == pytest.approx(seen["kv_usage_ratio"] * rep["memory_bytes"], rel=1e-6, abs=1)
    # the request holds whole blocks covering its prompt and output (a few hundred tokens)
    assert rep["block_size"] <= seen["mean_context_tokens"] <= 2048
    deadline = time.time() + 30
    while time.time() < deadline:
        g = _gauges(srv.get("/metrics").text)
        if g["factorkv_running_users"] == 0 and g["factorkv_kv_usage_ratio"] == 0:
            break
        time.sleep(0.2)
    assert g["factorkv_running_users"] == 0 and g["factorkv_kv_bytes_per_user_mean_context"] == 0
