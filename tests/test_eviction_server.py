"""`factorkv serve --kv-evict` over HTTP: eviction counters in /v1/kv-cache and /metrics equal
what the policy implies, logical vs physical tokens of a running request, per-request
``vllm_xargs.kv_evict_keep`` (and its 400s). A tiny random Llama with the default model's
tokenizer keeps start-up short."""

from __future__ import annotations

import math
import shutil
import time

import pytest

from engine.eviction.policy import L2NormPolicy as EvictionPolicy

pytestmark = pytest.mark.slow

VOCAB = 49152
BLOCK = 32
POLICY = EvictionPolicy(keep=0.5, sink=4, window=16)


@pytest.fixture(scope="module")
def evict_server(default_model_dir, tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests._server import running_server

    src = tmp_path_factory.mktemp("evict-http") / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)).save_pretrained(src)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (default_model_dir / f).exists():
            shutil.copy(default_model_dir / f, src / f)
    with running_server("--model", str(src), "--kv-evict", "keep=0.5,sink=4,window=16",
                        "--kv-cache-memory", "8MiB", "--max-model-len", "1024",
                        "--block-size", str(BLOCK), "--served-model-name", "tiny",
                        "--disable-uvicorn-access-log") as srv:
        yield srv


def _complete(srv, n_prompt: int, keep: float | None = None, max_tokens: int = 4):
    body = {"model": "tiny", "prompt": list(range(1000, 1000 + n_prompt)),
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if keep is not None:
        body["vllm_xargs"] = {"kv_evict_keep": keep}
    return srv.post("/v1/completions", body)


def _counters(srv) -> dict[str, float]:
    out = {}
    for line in srv.get("/metrics").text.splitlines():
        if line.startswith("factorkv_evict"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def test_counters_follow_the_policy(evict_server):
    srv = evict_server
    before = srv.get_json("/v1/kv-cache")["eviction"]
    assert before["enabled"] and before["policy"] == {"keep": 0.5, "sink": 4, "window": 16}
    r = _complete(srv, 400)
    assert r.status_code == 200, r.text
    kept = POLICY.num_kept(400)
    ev = srv.get_json("/v1/kv-cache")["eviction"]
    assert ev["evicted_tokens_total"] - before["evicted_tokens_total"] == 400 - kept == 200
    assert ev["freed_blocks_total"] - before["freed_blocks_total"] == \
        math.ceil(400 / BLOCK) - math.ceil(kept / BLOCK)
    assert ev["compactions_total"] - before["compactions_total"] == 1
    c = _counters(srv)
    assert c["factorkv_evicted_tokens_total"] == ev["evicted_tokens_total"]
    assert c["factorkv_evict_freed_blocks_total"] == ev["freed_blocks_total"]
    # keep=1.0 for one request: nothing evicted
    assert _complete(srv, 400, keep=1.0).status_code == 200
    assert srv.get_json("/v1/kv-cache")["eviction"]["evicted_tokens_total"] == ev["evicted_tokens_total"]
    # a per-request keep: 0.25 of 400
    assert _complete(srv, 400, keep=0.25).status_code == 200
    after = srv.get_json("/v1/kv-cache")["eviction"]["evicted_tokens_total"]
    assert after - ev["evicted_tokens_total"] == 400 - EvictionPolicy(keep=0.25, sink=4, window=16).num_kept(400)


def test_running_request_logical_vs_physical(evict_server):
    """Polled between the chunks of a streaming request: the scheduler writes its stats in
    the step that evicts, before the first token leaves the engine, so the request must
    show while its stream is still open. A first streaming request warms the API server
    up: its one-time set-up (~0.7 s) held back the first chunk until this tiny model had
    finished all 300 tokens (seen in the full suite and in CI)."""
    import requests

    srv = evict_server
    body = {"model": "tiny", "prompt": list(range(1000, 1600)), "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    warm = requests.post(srv.url("/v1/completions"), timeout=120,
                         json={**body, "prompt": [5, 6, 7], "max_tokens": 2})
    assert warm.status_code == 200, warm.text
    seen, chunks = None, 0
    with requests.post(srv.url("/v1/completions"), json=body, stream=True, timeout=120) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines():
            if not line.startswith(b"data: {"):
                continue
            chunks += 1
            if seen is None:
                reqs = srv.get_json("/v1/kv-cache")["eviction"]["requests"]
                seen = next(iter(reqs.values()), None)
    assert chunks > 1
    assert seen is not None, "the running request never showed in /v1/kv-cache"
    assert seen["logical_tokens"] - seen["physical_tokens"] == 600 - POLICY.num_kept(600)
    assert seen["physical_tokens"] >= POLICY.num_kept(600)
    deadline = time.time() + 10
    while time.time() < deadline and srv.get_json("/v1/kv-cache")["eviction"]["requests"]:
        time.sleep(0.2)
    c = _counters(srv)
    assert c["factorkv_evict_logical_tokens"] == c["factorkv_evict_physical_tokens"] == 0


@pytest.mark.parametrize("keep, needle", [(0, "keep must be in (0, 1], got 0.0"),
                                          (1.5, "got 1.5"), ("half", "must be a number")])
def test_bad_request_keep_is_400(evict_server, keep, needle):
    r = _complete(evict_server, 10, keep=keep)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert evict_server.get("/health").status_code == 200


def test_request_keep_needs_an_evicting_server(default_server):
    r = default_server.post("/v1/completions", {
        "model": "SmolLM2-135M-Instruct", "prompt": "Hi", "max_tokens": 1,
        "vllm_xargs": {"kv_evict_keep": 0.5}})
    assert r.status_code == 400
    assert "--kv-evict" in r.json()["error"]["message"]
