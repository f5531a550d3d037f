"""`factorkv` CLI: one-line errors for user mistakes, size parsing, serve argument defaults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from server.sizes import parse_size

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    err = proc.stderr
    assert proc.returncode == code, (proc.returncode, err[-2000:])
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("factorkv: error: "), lines[0]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


# ---------------------------------------------------------------- user errors


def test_missing_model_path_is_one_line_error(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    proc = run_cli("serve", "--model", str(missing))
    assert_one_line_error(proc, str(missing), "does not exist")


def test_positional_missing_model_path(tmp_path):
    proc = run_cli("serve", str(tmp_path / "nope"))
    assert_one_line_error(proc, "does not exist")


def test_corrupt_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    proc = run_cli("serve", "--model", str(tmp_path))
    assert_one_line_error(proc, "config.json", "not valid JSON")


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    proc = run_cli("serve", "--model", str(tmp_path))
    assert_one_line_error(proc, "no config.json")


def test_model_dir_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "model_type": "llama"}))
    proc = run_cli("serve", "--model", str(tmp_path))
    assert_one_line_error(proc, "no weights")


def test_truncated_safetensors(tmp_path):
    import torch
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"],
                                                      "model_type": "llama"}))
    f = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(f))
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])  # an interrupted copy
    (tmp_path / "tokenizer.json").write_text("{}")
    proc = run_cli("serve", "--model", str(tmp_path))
    assert_one_line_error(proc, "model.safetensors", "not a valid safetensors file")


def test_model_path_is_a_file(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF")
    proc = run_cli("serve", "--model", str(f))
    assert_one_line_error(proc, "not a directory")


@pytest.mark.slow
def test_bad_sizes_are_usage_errors():
    # Parsed by vLLM's parser (imports vLLM, ~10 s), still one line and exit status 2.
    proc = run_cli("serve", "--kv-cache-memory", "12XB")
    assert_one_line_error(proc, "--kv-cache-memory", "12XB")


def test_unknown_command_and_option():
    assert_one_line_error(run_cli("frobnicate"), "frobnicate")
    assert_one_line_error(run_cli("prepare", "--no-such-flag"), "--no-such-flag")


def test_top_level_help_lists_commands():
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "serve" in proc.stdout and "prepare" in proc.stdout


def test_prepare_prints_model_dir(default_model_dir, default_variant_dir):
    env = {"FACTORKV_CACHE_DIR": str(default_model_dir.parent.parent)}
    proc = run_cli("prepare", "--quiet", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(default_variant_dir)      # what `factorkv serve` serves
    proc = run_cli("prepare", "--quiet", "--variant", "original", env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(default_model_dir)
    assert_one_line_error(run_cli("prepare", "--quiet", "--variant", "thin-r3", env=env),
                          "thin-r3")


# ---------------------------------------------------------------- sizes


@pytest.mark.parametrize("text,expected", [
    ("268435456", 268435456),
    ("1e9", 10**9),
    ("256MiB", 256 * 2**20),
    ("4GiB", 4 * 2**30),
    ("4gib", 4 * 2**30),
    ("512Mi", 512 * 2**20),
    ("1.5GiB", int(1.5 * 2**30)),
    ("1GB", 10**9),
    ("500mb", 500 * 10**6),
    ("4G", 4 * 2**30),     # like vLLM's human_readable_int: upper-case letter = binary
    ("4g", 4 * 10**9),     # lower-case letter = decimal
    (" 64 KiB ", 64 * 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12XB", "-5", "0", "1iB", "GiB", "0.1"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


# ---------------------------------------------------------------- serve arguments


@pytest.fixture(scope="module")
def serve_parser():
    from server.cli import build_parser

    _, sub = build_parser("serve")
    return sub


def test_serve_defaults_on_cpu(serve_parser, default_model_dir, default_variant_dir, monkeypatch):
    from server.errors import CLIError
    from server.serve import CPU_DEFAULT_KV_CACHE_BYTES, finalize_args

    monkeypatch.setenv("FACTORKV_CACHE_DIR", str(default_model_dir.parent.parent))
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    args = finalize_args(serve_parser.parse_args([]))
    assert args.model == str(default_variant_dir)        # the calibrated factored build
    original = finalize_args(serve_parser.parse_args(["--variant", "original"]))
    assert original.model == str(default_model_dir)
    assert original.served_model_name == ["SmolLM2-135M-Instruct"]
    with pytest.raises(CLIError, match="--variant"):
        finalize_args(serve_parser.parse_args(["--variant", "original", "--model",
                                               str(default_model_dir)]))
    assert args.served_model_name == ["SmolLM2-135M-Instruct"]
    assert args.host == "127.0.0.1"
    assert args.dtype == "float32" and args.enforce_eager is True
    assert args.kv_cache_memory_bytes == CPU_DEFAULT_KV_CACHE_BYTES
    assert isinstance(args.gpu_memory_utilization, float)


def test_serve_accepts_factorkv_and_vllm_flags(serve_parser, default_model_dir):
    from server.serve import finalize_args

    args = serve_parser.parse_args([
        "--model", str(default_model_dir), "--kv-cache-memory", "256MiB", "--api-key", "sekret",
        "--max-num-seqs", "8", "--dtype", "bfloat16", "--no-enforce-eager",
        "--max_model_len", "1024",  # vLLM's FlexibleArgumentParser: underscores work too
        "--served-model-name", "smol", "--port", "9123"])
    args = finalize_args(args)
    assert args.kv_cache_memory_bytes == 256 * 2**20
    assert args.api_key == ["sekret"]
    assert args.max_num_seqs == 8 and args.max_model_len == 1024
    assert args.dtype == "bfloat16" and args.enforce_eager is False  # user choices kept
    assert args.served_model_name == ["smol"] and args.port == 9123


def test_serve_engine_args_roundtrip(serve_parser, default_model_dir):
    """The namespace still builds vLLM's AsyncEngineArgs (what the launcher does)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from server.serve import finalize_args

    args = finalize_args(serve_parser.parse_args(["--kv-cache-memory", "1e8", "--max-model-len", "1024", str(default_model_dir)]))
    ea = AsyncEngineArgs.from_cli_args(args)
    assert ea.model == str(default_model_dir)
    assert ea.kv_cache_memory_bytes == 10**8
    assert ea.dtype == "float32" and ea.enforce_eager is True


@pytest.mark.slow
def test_kv_budget_too_small_for_max_len_is_one_line(default_model_dir):
    # 256 MiB of fp32 SmolLM2 KV = 45 blocks of 128 tokens, one held back by vLLM: 5632 tokens.
    proc = run_cli("serve", "--model", str(default_model_dir), "--kv-cache-memory", "256MiB",
                   "--max-model-len", "5760")
    assert_one_line_error(proc, "5632", "--max-model-len 5632 or less")


@pytest.mark.parametrize("argv,needle", [
    (["--kv-cache-memory", "1MiB"], "too small"),
    (["--kv-cache-memory", "256MiB"], "the model's max length is 8192"),
    (["--max-num-seqs", "0"], "--max-num-seqs"),
    (["--kv-cache-memory", "1GiB", "--kv-cache-memory-bytes", "5"], "not both"),
    (["--headless"], "not supported"),
    (["--kv-evict", "keep=0"], "keep must be in .0, 1., got 0.0"),
    (["--kv-evict", "keep=1.5"], "keep must be in .0, 1., got 1.5"),
    (["--kv-evict", "keep=0.5,window=9000"], "must be smaller than the context length 8192"),
    (["--kv-evict", "keep=0.5,window=1020", "--max-model-len", "1024"], "= 1024 must be smaller than the context length 1024"),
    (["--kv-evict", "keep=0.5,bogus=1"], "unknown field 'bogus'"),
    (["--kv-evict", "sink=4"], "keep= is required"),
])
def test_serve_argument_errors(serve_parser, default_model_dir, argv, needle):
    from server.errors import CLIError
    from server.serve import finalize_args

    with pytest.raises(CLIError, match=needle.replace("-", "\\-")) as e:
        finalize_args(serve_parser.parse_args(["--model", str(default_model_dir), *argv]))
    assert e.value.code == 2


def test_serve_kv_evict_installs_scheduler_and_worker(serve_parser, default_model_dir):
    from server.serve import finalize_args

    args = finalize_args(serve_parser.parse_args(
        ["--model", str(default_model_dir), "--kv-evict", "keep=0.5,window=32"]))
    assert args.scheduler_cls == "engine.eviction.scheduler.EvictionScheduler"
    assert args.worker_cls == "engine.eviction.worker.EvictingCPUWorker"
    cfg = args.additional_config["factorkv_kv_evict"]
    assert (cfg["keep"], cfg["sink"], cfg["window"]) == (0.5, 4, 32) and cfg["stats_path"]


def test_kv_budget_fits_exactly(serve_parser, default_model_dir):
    from server.serve import finalize_args

    args = finalize_args(serve_parser.parse_args(
        ["--model", str(default_model_dir), "--kv-cache-memory", "256MiB", "--max-model-len", "5632"]))
    assert args.kv_cache_memory_bytes == 256 * 2**20


def test_serve_kv_evict_accepts_latent_keys(serve_parser, tmp_path):
    """Latent keys compose with eviction (per-layer selection, positions kept by the worker)."""
    from server.serve import finalize_args
    from tests.engine_utils import tiny_llama, write_latent

    ckpt = write_latent(tiny_llama(tmp_path / "src"), tmp_path / "latent", 8, 1)
    args = finalize_args(serve_parser.parse_args(["--model", str(ckpt), "--skip-tokenizer-init",
                                                  "--kv-evict", "keep=0.5"]))
    assert args.worker_cls == "engine.eviction.worker.EvictingCPUWorker"
