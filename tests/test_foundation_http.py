"""HTTP round trip with the official `openai` client against a real `factorkv serve`."""

from __future__ import annotations

import pytest

from tests.conftest import DEFAULT_SERVED_NAME

pytestmark = pytest.mark.slow


def test_health(default_server):
    assert default_server.get("/health").status_code == 200


def test_startup_line(default_server):
    lines = [ln for ln in default_server.log_text().splitlines() if ln.startswith("factorkv: serving")]
    assert len(lines) == 1, default_server.log_tail()
    assert DEFAULT_SERVED_NAME in lines[0] and "float32" in lines[0]


def test_models_lists_default_model(openai_client):
    ids = [m.id for m in openai_client.models.list().data]
    assert ids == [DEFAULT_SERVED_NAME]


def test_chat_capital_of_france(openai_client):
    r = openai_client.chat.completions.create(
        model=DEFAULT_SERVED_NAME, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    text = r.choices[0].message.content
    assert "Paris" in text, text
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens > 0


def test_chat_streaming(openai_client):
    stream = openai_client.chat.completions.create(
        model=DEFAULT_SERVED_NAME, temperature=0, max_tokens=24, stream=True,
        messages=[{"role": "user", "content": "Count from one to twenty in words."}])
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 5, chunks
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals and finals[-1] in ("stop", "length"), chunks[-3:]
    assert "".join(content).strip()


def test_completions(openai_client):
    r = openai_client.completions.create(model=DEFAULT_SERVED_NAME, prompt="The capital of France is",
                                         max_tokens=8, temperature=0)
    assert "Paris" in r.choices[0].text, r.choices[0].text
    assert r.usage.prompt_tokens > 0


def test_metrics_expose_vllm(default_server, openai_client):
    openai_client.completions.create(model=DEFAULT_SERVED_NAME, prompt="Hello", max_tokens=2)
    r = default_server.get("/metrics")
    assert r.status_code == 200
    text = r.text
    for name in ("vllm:num_requests_running", "vllm:kv_cache_usage_perc", "vllm:generation_tokens"):
        assert name in text, name
    assert "factorkv_kv_cache_capacity_tokens" in text


def test_factorkv_info(default_server):
    info = default_server.get_json("/factorkv/info")
    kv = info["kv_cache"]
    assert info["dtype"] == "float32" and info["enforce_eager"] is True
    assert kv["memory_bytes"] == 256 * 2**20
    assert kv["size_tokens"] == kv["num_blocks"] * kv["block_size"] > 0
    assert info["max_model_len"] == 2048
