"""Bad input, fuzzing and client disconnects against the shared `factorkv serve`
(``default_server``: default model, 256 MiB KV, max-model-len 2048, no API key).

* every bad request gets a 4xx with an OpenAI-style error JSON, never a 5xx, and the
  server stays healthy and answers a normal request afterwards;
* schemathesis fuzzes the whole OpenAPI schema (bounded examples): zero 5xx, no crash;
* clients that walk away mid-stream (or mid-wait) abort their requests: running
  requests and KV cache usage on /metrics go back to 0.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests._robustness import (drop, is_openai_error, metrics, open_request, raw_request, upload,
                               wait_idle)
from tests.conftest import DEFAULT_SERVED_NAME as M

REPO = Path(__file__).resolve().parents[1]
MSG = [{"role": "user", "content": "hi"}]
CHAT, COMPL = "/v1/chat/completions", "/v1/completions"


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


def _raw(template: str) -> bytes:
    return template.replace("$M", M).encode()


#: (name, method, path, exact body bytes, expected status or None for "any 4xx")
BAD_INPUTS = [
    ("malformed JSON", "POST", CHAT, b'{"model": "x", "messages": [', 400),
    ("not JSON at all", "POST", CHAT, b"hello", 400),
    ("JSON array body", "POST", CHAT, b"[1, 2]", 400),
    ("empty body", "POST", CHAT, b"", 400),
    ("messages is a string", "POST", CHAT, _j({"model": M, "messages": "hi"}), 400),
    ("max_tokens is a string", "POST", CHAT, _j({"model": M, "messages": MSG, "max_tokens": "ten"}), 400),
    ("unknown model", "POST", CHAT, _j({"model": "no-such-model", "messages": MSG}), 404),
    ("prompt longer than the context", "POST", COMPL,
     _j({"model": M, "prompt": "hello " * 3000, "max_tokens": 4}), 400),
    ("chat longer than the context", "POST", CHAT,
     _j({"model": M, "messages": [{"role": "user", "content": "hello " * 3000}], "max_tokens": 4}), 400),
    ("max_tokens beyond the context", "POST", COMPL, _j({"model": M, "prompt": "hi", "max_tokens": 100000}), 400),
    ("max_tokens 10^30", "POST", COMPL, _j({"model": M, "prompt": "hi", "max_tokens": 10**30}), 400),
    ("max_tokens negative", "POST", COMPL, _j({"model": M, "prompt": "hi", "max_tokens": -1}), 400),
    ("temperature negative", "POST", COMPL, _j({"model": M, "prompt": "hi", "temperature": -1}), 400),
    ("temperature NaN", "POST", COMPL, _raw('{"model": "$M", "prompt": "hi", "temperature": NaN}'), 400),
    ("temperature Infinity", "POST", COMPL, _raw('{"model": "$M", "prompt": "hi", "temperature": Infinity}'), 400),
    ("top_p NaN (chat)", "POST", CHAT,
     _raw('{"model": "$M", "messages": [{"role": "user", "content": "hi"}], "top_p": NaN}'), 400),
    ("top_p negative", "POST", COMPL, _j({"model": M, "prompt": "hi", "top_p": -0.5}), 400),
    ("top_k negative", "POST", COMPL, _j({"model": M, "prompt": "hi", "top_k": -5}), 400),
    ("frequency_penalty NaN", "POST", COMPL, _raw('{"model": "$M", "prompt": "hi", "frequency_penalty": NaN}'), 400),
    ("presence_penalty 1e308", "POST", COMPL, _j({"model": M, "prompt": "hi", "presence_penalty": 1e308}), 400),
    ("logit_bias NaN", "POST", COMPL, _raw('{"model": "$M", "prompt": "hi", "logit_bias": {"5": NaN}}'), 400),
    ("logit_bias out-of-vocab", "POST", COMPL, _j({"model": M, "prompt": "hi", "logit_bias": {"999999999": 5}}), 400),
    ("seed 10^30", "POST", COMPL, _j({"model": M, "prompt": "hi", "seed": 10**30, "max_tokens": 2}), 400),
    ("n = 10^9", "POST", CHAT, _j({"model": M, "messages": MSG, "n": 10**9, "max_tokens": 2}), 400),
    ("n = 100000", "POST", COMPL, _j({"model": M, "prompt": "hi", "n": 100000, "max_tokens": 2}), 400),
    ("n = 0", "POST", COMPL, _j({"model": M, "prompt": "hi", "n": 0, "max_tokens": 2}), 400),
    ("logprobs 100000", "POST", COMPL, _j({"model": M, "prompt": "hi", "logprobs": 100000}), 400),
    ("top_logprobs 100000", "POST", CHAT,
     _j({"model": M, "messages": MSG, "logprobs": True, "top_logprobs": 100000}), 400),
    ("invalid UTF-8", "POST", CHAT,
     b'{"model": "' + M.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
    ("lone UTF-16 surrogate", "POST", CHAT,
     _raw('{"model": "$M", "messages": [{"role": "user", "content": "\\ud800 x"}], "max_tokens": 2}'), 400),
    ("empty message list", "POST", CHAT, _j({"model": M, "messages": []}), 400),
    ("empty prompt", "POST", COMPL, _j({"model": M, "prompt": "", "max_tokens": 2}), 400),
    ("empty prompt list", "POST", COMPL, _j({"model": M, "prompt": [], "max_tokens": 2}), 400),
    ("token id out of vocabulary", "POST", COMPL, _j({"model": M, "prompt": [10**9], "max_tokens": 2}), 400),
    ("min_tokens > max_tokens", "POST", COMPL, _j({"model": M, "prompt": "hi", "min_tokens": 50, "max_tokens": 2}), 400),
    ("bad regex constraint", "POST", COMPL,
     _j({"model": M, "prompt": "hi", "structured_outputs": {"regex": "(["}, "max_tokens": 2}), 400),
    ("bad JSON schema", "POST", CHAT, _j({"model": M, "messages": MSG, "max_tokens": 2, "response_format":
                                           {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}}), 400),
    ("tool without function", "POST", CHAT, _j({"model": M, "messages": MSG, "tools": [{"type": "function"}]}), 400),
    ("request chat template (untrusted)", "POST", CHAT,
     _j({"model": M, "messages": MSG, "chat_template": "{% for %}", "max_tokens": 2}), 400),
    ("image for a text model", "POST", CHAT, _j({"model": M, "max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}), 400),
    ("stream with bad temperature", "POST", CHAT,
     _j({"model": M, "messages": MSG, "stream": True, "temperature": -3}), 400),
    ("deeply nested JSON", "POST", CHAT, b'{"model": "x", "messages": ' + b"[" * 50000 + b"]" * 50000 + b"}", 400),
    ("unsupported structured-decision API", "POST", "/v1/systemone", _j({"questions": {}}), 400),
    ("wrong method", "DELETE", COMPL, b"", 405),
    ("unknown path", "GET", "/v1/no-such-route", b"", 404),
]


@pytest.mark.parametrize("name, method, path, body, expected", BAD_INPUTS,
                         ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_openai_4xx(default_server, name, method, path, body, expected):
    status, _, content = raw_request(default_server, method, path, body, timeout=120)
    assert 400 <= status < 500, (name, status, content[:300])
    if expected is not None:
        assert status == expected, (name, status, content[:300])
    assert is_openai_error(content, status), (name, content[:300])


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_oversized_body_is_413(default_server, chunked):
    """17 MiB > the default --max-request-body-bytes (16 MiB): refused before vLLM parses it,
    whether the size is declared up front or only found while reading."""
    body = b'{"model": "x", "prompt": "' + b"a" * (17 << 20) + b'"}'
    status, content = upload(default_server, COMPL, body, chunked=chunked)
    assert status == 413 and is_openai_error(content, 413), (status, content[:300])
    assert default_server.get("/health", timeout=10).status_code == 200


def _assert_healthy_and_answering(srv):
    assert srv.get("/health", timeout=10).status_code == 200, srv.log_tail()
    r = srv.post(CHAT, {"model": M, "messages": [{"role": "user", "content": "What is the capital "
                                                  "of France?"}], "max_tokens": 16, "temperature": 0})
    assert r.status_code == 200, r.text[:300]
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_healthy_after_bad_inputs(default_server):
    for _, method, path, body, _ in BAD_INPUTS:  # again, back to back
        raw_request(default_server, method, path, body, timeout=120)
    for path in ("/v1/no-such-route", "/v1/completions", "/health"):  # HEAD: no body back
        status, _, content = raw_request(default_server, "HEAD", path, timeout=30)
        assert status in (200, 404, 405) and content == b"", (path, status, content[:200])
    assert default_server.is_running()
    _assert_healthy_and_answering(default_server)


@pytest.mark.slow
def test_client_disconnects_free_requests_and_kv(default_server):
    """Three streams dropped after a few chunks and a non-streaming request whose client
    leaves while it waits: all four were running and holding KV blocks; once the clients
    are gone, running requests and KV usage on /metrics return to 0 (bounded wait)."""
    wait_idle(default_server, timeout=60)
    long = {"model": M, "max_tokens": 1500, "ignore_eos": True, "temperature": 0}
    socks = [open_request(default_server, COMPL, {**long, "prompt": f"Story {i}:", "stream": True},
                          read_bytes=600) for i in range(3)]
    socks.append(open_request(default_server, CHAT, {**long, "messages": [
        {"role": "user", "content": "Talk about the sea."}]}))
    deadline = time.monotonic() + 30
    while True:
        m = metrics(default_server)
        if m.get("vllm:num_requests_running", 0) == 4:
            break
        assert time.monotonic() < deadline, m.get("vllm:num_requests_running")
        time.sleep(0.2)
    assert m["vllm:kv_cache_usage_perc"] > 0
    t0 = time.monotonic()
    for s in socks:
        drop(s)
    m = wait_idle(default_server, timeout=30)  # 1500 tokens each would take minutes here
    print(f"disconnects: 4 running requests aborted, KV usage back to 0 in "
          f"{time.monotonic() - t0:.1f} s")
    _assert_healthy_and_answering(default_server)


#: The coverage phase derives thousands of boundary cases per operation (~5,000 in ~15 s);
#: for these two it derives thousands of *valid* generations (minutes on 2 cores), so they
#: get the fuzzing phase only.
COVERAGE_SKIP = ("/v1/responses", "/v1/chat/completions/batch")


def _schemathesis(srv, tmp_path, name: str, *args: str) -> str:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests._schemathesis_hooks", "FACTORKV_FUZZ_MODEL": M,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "schemathesis.cli", "run", srv.url("/openapi.json"),
           "--checks", "not_a_server_error", "--seed", "1", "--workers", "1",
           "--request-timeout", "60", "--no-color", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    (tmp_path / f"schemathesis-{name}.txt").write_text(out)
    assert "Test cases:" in out, out[-3000:]
    assert "Server error" not in out and "ST101" not in out, out[-6000:]
    assert proc.returncode == 0, out[-6000:]
    return out


@pytest.mark.slow
def test_schemathesis_fuzz_no_5xx(default_server, tmp_path):
    """Fuzz every operation of the server's OpenAPI schema with schemathesis (fixed seed):
    the coverage phase (boundary and negative values) and 25 fuzzed examples per operation.
    Check: not_a_server_error (no 5xx); afterwards the server is up and answers."""
    skip = [a for p in COVERAGE_SKIP for a in ("--exclude-path", p)]
    cov = _schemathesis(default_server, tmp_path, "coverage", "--phases", "coverage", *skip)
    fuzz = _schemathesis(default_server, tmp_path, "fuzzing", "--phases", "examples,fuzzing",
                         "--max-examples", "25")
    cases = [int(re.search(r"(\d+) generated", out).group(1)) for out in (cov, fuzz)]
    assert sum(cases) > 1000, cases
    print(f"schemathesis: {cases[0]} coverage + {cases[1]} fuzzing cases, 0 server errors")
    assert default_server.is_running()
    wait_idle(default_server, timeout=60)
    _assert_healthy_and_answering(default_server)
