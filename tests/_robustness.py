"""Helpers for the tests/test_robustness*.py files: raw HTTP to 127.0.0.1, /metrics
parsing, streaming clients that finish or walk away, and the engine-core child process."""

from __future__ import annotations

import json
import re
import socket
import time

METRIC_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(srv, **kw) -> dict[str, float]:
    """GET /metrics → {name: value summed over label sets}."""
    r = srv.get("/metrics", timeout=10, **kw)
    assert r.status_code == 200, r.text[:300]
    out: dict[str, float] = {}
    for line in r.text.splitlines():
        m = METRIC_RE.match(line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def wait_idle(srv, timeout: float = 30.0, **kw) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and the KV cache is empty."""
    deadline = time.monotonic() + timeout
    m = {}
    while time.monotonic() < deadline:
        m = metrics(srv, **kw)
        if (m.get("vllm:num_requests_running", 0) == 0 and m.get("vllm:num_requests_waiting", 0) == 0
                and m.get("vllm:kv_cache_usage_perc", 0) == 0):
            return m
        time.sleep(0.5)
    raise AssertionError(f"server not idle after {timeout} s: running="
                         f"{m.get('vllm:num_requests_running')} waiting="
                         f"{m.get('vllm:num_requests_waiting')} kv={m.get('vllm:kv_cache_usage_perc')}")


def is_openai_error(body: bytes, status: int) -> bool:
    try:
        data = json.loads(body)
    except ValueError:
        return False
    err = data.get("error") if isinstance(data, dict) else None
    return (isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"]
            and isinstance(err.get("type"), str) and err.get("code") == status)


def raw_request(srv, method: str, path: str, body: bytes = b"", headers: dict | None = None,
                timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 request with an exact byte body (no client-side JSON encoding)."""
    import http.client

    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json", **(headers or {})}
        if srv.api_key:
            hdrs.setdefault("Authorization", f"Bearer {srv.api_key}")
        conn.request(method, path, body=body if method != "GET" else None, headers=hdrs)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def open_request(srv, path: str, body: dict, read_bytes: int = 0,
                 timeout: float = 60.0) -> socket.socket:
    """Send a request on a raw socket and read ``read_bytes`` of the answer; the caller
    then walks away with :func:`drop` (the rest is never read)."""
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
            + (f"Authorization: Bearer {srv.api_key}\r\n" if srv.api_key else "") + "\r\n")
    s = socket.create_connection((srv.host, srv.port), timeout=timeout)
    s.sendall(head.encode() + data)
    got = 0
    while got < read_bytes:
        chunk = s.recv(4096)
        assert chunk, "the server closed the stream early"
        got += len(chunk)
    return s


def drop(s: socket.socket) -> None:
    """Close abruptly (RST, like a killed client)."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()


def generate(srv, model: str, i: int, max_tokens: int, stream: bool,
             timeout: float = 300.0) -> dict:
    """One /v1/completions request that must produce exactly ``max_tokens`` tokens.
    Returns {"status", "tokens", "complete", "retry_after", "body"}."""
    import requests

    body = {"model": model, "prompt": f"Request {i}: tell a story.",
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    hdrs = {"Authorization": f"Bearer {srv.api_key}"} if srv.api_key else {}
    r = requests.post(srv.url("/v1/completions"), json=body, headers=hdrs, stream=stream,
                      timeout=timeout)
    out = {"status": r.status_code, "tokens": 0, "complete": False,
           "retry_after": r.headers.get("retry-after"), "body": b""}
    if r.status_code != 200:
        out["body"] = r.content
        return out
    if not stream:
        data = r.json()
        out["tokens"] = data["usage"]["completion_tokens"]
        out["complete"] = data["choices"][0]["finish_reason"] == "length" \
            and out["tokens"] == max_tokens
        return out
    finish, done = None, False
    for line in r.iter_lines():
        if line == b"data: [DONE]":
            done = True
        elif line.startswith(b"data: "):
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices") or []:
                finish = c.get("finish_reason") or finish
    out["complete"] = done and finish == "length" and out["tokens"] == max_tokens
    return out


def engine_core_pid(server_pid: int) -> int:
    """The vLLM engine-core child (process title ``VLLM::EngineCore``) of the server."""
    import psutil

    for child in psutil.Process(server_pid).children(recursive=True):
        try:
            if "EngineCore" in child.name() or "EngineCore" in " ".join(child.cmdline()):
                return child.pid
        except psutil.Error:
            continue
    raise AssertionError(f"no EngineCore child under pid {server_pid}")


def upload(srv, path: str, body: bytes, chunked: bool = False,
           timeout: float = 60.0) -> tuple[int, bytes]:
    """POST a large body the way curl does: stop sending as soon as the server answers
    (a server may refuse an oversized body early and close). Returns (status, body)."""
    import select

    head = f"POST {path} HTTP/1.1\r\nHost: {srv.host}:{srv.port}\r\nContent-Type: application/json\r\n"
    head += "Transfer-Encoding: chunked\r\n" if chunked else f"Content-Length: {len(body)}\r\n"
    if srv.api_key:
        head += f"Authorization: Bearer {srv.api_key}\r\n"
    s = socket.create_connection((srv.host, srv.port), timeout=timeout)
    try:
        s.sendall((head + "Connection: close\r\n\r\n").encode())
        step = 1 << 16
        for off in range(0, len(body), step):
            if select.select([s], [], [], 0)[0]:
                break  # the server has answered
            piece = body[off:off + step]
            try:
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            except OSError:
                break
        else:
            try:
                s.sendall(b"0\r\n\r\n" if chunked else b"")
            except OSError:
                pass
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            data += chunk
    finally:
        s.close()
    head_end = data.find(b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 ") and head_end > 0, data[:200]
    status = int(data[9:12])
    rest = data[head_end + 4:]
    if b"transfer-encoding: chunked" in data[:head_end].lower():
        out, i = b"", 0
        while True:
            j = rest.find(b"\r\n", i)
            n = int(rest[i:j], 16)
            if n == 0:
                break
            out += rest[j + 2:j + 2 + n]
            i = j + 2 + n + 2
        rest = out
    return status, rest
