"""Tensor parallelism on CPU out of the box: `factorkv serve --tensor-parallel-size 2` splits
the allowed cores among the ranks (VLLM_CPU_OMP_THREADS_BIND) where vLLM's NUMA-node binding
cannot, leaves the user's own setting alone, and a factored model gives the same greedy
tokens under TP = 2 as under TP = 1."""

from __future__ import annotations

import os

import pytest
import torch

from server.errors import CLIError
from server.serve import finalize_args, threads_bind

THREADS_BIND = "VLLM_CPU_OMP_THREADS_BIND"


@pytest.mark.parametrize("cores, ranks, want", [
    ([0, 1], 2, "0|1"),
    (list(range(8)), 2, "0-3|4-7"),
    (list(range(8)), 4, "0-1|2-3|4-5|6-7"),
    ([0, 1, 2], 2, "0|1"),                     # the odd core stays free
    ([0, 2, 4, 6], 2, "0,2|4,6"),
    ([4, 5, 6, 7], 1, "4-7"),
])
def test_threads_bind_splits_cores_evenly(cores, ranks, want):
    assert threads_bind(cores, ranks) == want


@pytest.fixture(scope="module")
def serve_parser():
    from server.cli import build_parser

    return build_parser("serve")[1]


@pytest.fixture
def serve(serve_parser, tmp_path, monkeypatch):
    """finalize_args on CPU with one NUMA node and 4 allowed cores (model checks stubbed);
    returns the VLLM_CPU_OMP_THREADS_BIND it leaves."""
    import vllm.utils.cpu_resource_utils as cr

    monkeypatch.setenv(THREADS_BIND, "-")      # recorded, so the teardown restores the real state
    monkeypatch.delenv(THREADS_BIND)
    monkeypatch.setattr(cr, "get_visible_memory_node", lambda: [0])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr("server.serve._on_cpu", lambda: True)
    monkeypatch.setattr("server.serve.check_model_dir", lambda *a, **k: {})
    monkeypatch.setattr("server.serve.check_kv_budget", lambda *a, **k: None)

    def run(tp: int = 1, pp: int = 1) -> str | None:
        finalize_args(serve_parser.parse_args([
            "--model", str(tmp_path), "--tensor-parallel-size", str(tp),
            "--pipeline-parallel-size", str(pp)]))
        return os.environ.get(THREADS_BIND)
    return run


def test_tp_on_one_numa_node_gets_a_core_split(serve):
    assert serve(tp=2) == "0-1|2-3"


def test_tp_times_pp_ranks(serve):
    assert serve(tp=2, pp=2) == "0|1|2|3"


def test_tp1_is_untouched_and_the_users_setting_wins(serve, monkeypatch):
    assert serve(tp=1) is None
    monkeypatch.setenv(THREADS_BIND, "1|0")
    assert serve(tp=2) == "1|0"


def test_enough_numa_nodes_keep_vllms_own_binding(serve, monkeypatch):
    import vllm.utils.cpu_resource_utils as cr

    monkeypatch.setattr(cr, "get_visible_memory_node", lambda: [0, 1])
    assert serve(tp=2) is None


def test_more_ranks_than_cores_is_a_one_line_error(serve):
    with pytest.raises(CLIError, match="8 tensor/pipeline-parallel ranks need at least 8 CPU cores"):
        serve(tp=8)


def test_joint_latent_over_two_ranks_is_a_one_line_error(tmp_path):
    from server.model_check import check_latent_groups

    cfg = {"num_key_value_heads": 2, "factored_keys": {"key_mode": "latent", "latent_groups": 1}}
    with pytest.raises(CLIError, match="latent among 2 of its 2 KV heads"):
        check_latent_groups(cfg, 2)
    check_latent_groups({**cfg, "factored_keys": {"key_mode": "latent", "latent_groups": 2}}, 2)
    check_latent_groups(cfg, 1)


@pytest.mark.slow
@pytest.mark.parametrize("keys", ["thin", "latent"])
def test_tp2_greedy_tokens_equal_tp1(tmp_path, monkeypatch, keys):
    """A tiny factored Llama (4 query / 2 KV heads: both split over 2 ranks), served with
    TP = 1 and then TP = 2 with no hand-set binding: the same greedy tokens. Latent keys: one
    latent per KV head (latent_groups = 2), so each rank holds its own."""
    from model_patches.conversion.checkpoint_writer import write_rotary_pair_subset
    from tests._server import running_server
    from tests.engine_utils import tiny_llama, write_latent

    monkeypatch.delenv(THREADS_BIND, raising=False)
    src = tiny_llama(tmp_path / "src", heads=4, kv_heads=2)
    model = (write_rotary_pair_subset(src, tmp_path / "r8", 8) if keys == "thin"
             else write_latent(src, tmp_path / "latent", 8, 2))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (5, 37, 150)]
    tokens = {}
    for tp in (1, 2):
        with running_server("--model", str(model), "--skip-tokenizer-init", "--kv-cache-memory",
                            "64MiB", "--max-model-len", "512", "--tensor-parallel-size", str(tp),
                            "--served-model-name", "tiny") as srv:
            tokens[tp] = []
            for p in prompts:
                r = srv.post("/v1/completions", {
                    "model": "tiny", "prompt": p, "max_tokens": 16, "temperature": 0,
                    "ignore_eos": True, "return_token_ids": True}, timeout=120)
                assert r.status_code == 200, r.text[:500]
                tokens[tp].append(r.json()["choices"][0]["token_ids"])
            if tp == 2:
                assert "VLLM_CPU_OMP_THREADS_BIND='" in srv.log_text()
    assert len({t for seq in tokens[1] for t in seq}) > 5       # not a degenerate repetition
    assert tokens[2] == tokens[1]
