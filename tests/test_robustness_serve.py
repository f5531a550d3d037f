"""Overload, access, SIGTERM drain and engine death, each on a dedicated `factorkv serve`.

Two small servers (default model, max-model-len 512, 128 MiB KV, max-num-seqs 2):

* ``guarded``: ``--max-queued-requests 2`` (so 4 generation requests at once),
  ``--api-key``, ``--protect-metrics``, ``--max-request-body-bytes 64KiB``,
  ``--shutdown-timeout 60``. 3x the load it holds: the extra requests get 429 with
  Retry-After, every admitted one completes. Then SIGTERM mid-generation: the requests in
  flight finish, a late one gets 503, the process exits 0.
* ``unbounded``: vLLM's default (no queue cap), ``--api-key`` without
  ``--protect-metrics``: the same load all queues and completes. Then the engine-core
  process is killed: /health fails and the server exits non-zero, leaving no processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests._robustness import engine_core_pid, generate, is_openai_error, metrics, raw_request, wait_idle
from tests._server import REPO, ServerProcess
from tests.conftest import DEFAULT_SERVED_NAME as M

pytestmark = pytest.mark.slow

KEY = "fkv-test-key"
SMALL = ("--max-model-len", "512", "--kv-cache-memory", "128MiB", "--max-num-seqs", "2",
         "--disable-uvicorn-access-log")
MAX_NUM_SEQS, QUEUED = 2, 2
LOAD = 3 * (MAX_NUM_SEQS + QUEUED)      # 3x what the guarded server holds
TOKENS = 24


def _server(default_model_dir, tmp_path_factory, name, *args):
    cache_root = default_model_dir.parent.parent
    srv = ServerProcess([*SMALL, *args], env={"FACTORKV_CACHE_DIR": str(cache_root)},
                        api_key=KEY, log_dir=tmp_path_factory.mktemp(name))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def guarded(default_model_dir, tmp_path_factory):
    srv = _server(default_model_dir, tmp_path_factory, "guarded",
                  "--max-queued-requests", str(QUEUED), "--protect-metrics",
                  "--max-request-body-bytes", "64KiB", "--shutdown-timeout", "60")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def unbounded(default_model_dir, tmp_path_factory):
    srv = _server(default_model_dir, tmp_path_factory, "unbounded")
    yield srv
    srv.stop()


def _burst(srv, n: int, tokens: int = TOKENS) -> list[dict]:
    """n clients released at once (half streaming), each asking for ``tokens`` tokens."""
    gate = threading.Barrier(n)

    def one(i):
        gate.wait(timeout=30)
        return generate(srv, M, i, tokens, stream=bool(i % 2))

    with ThreadPoolExecutor(n) as ex:
        return list(ex.map(one, range(n)))


def _no_key(srv, method, path, body=b"{}", key=None):
    hdrs = {"Authorization": f"Bearer {key}"} if key else {"Authorization": ""}
    saved, srv.api_key = srv.api_key, None
    try:
        return raw_request(srv, method, path, body, headers=hdrs, timeout=30)
    finally:
        srv.api_key = saved


GENERATION_ROUTES = [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"),
                     ("GET", "/v1/models"), ("POST", "/v1/responses"), ("POST", "/v1/messages"),
                     ("POST", "/invocations"), ("POST", "/tokenize"), ("GET", "/factorkv/info"),
                     ("GET", "/v1/kv-cache")]


# -- guarded server -------------------------------------------------------------------------

def test_api_key_required_everywhere_but_probes(guarded):
    chat = json.dumps({"model": M, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 2}).encode()
    for method, path in GENERATION_ROUTES:
        for key in (None, "wrong-key"):
            status, _, body = _no_key(guarded, method, path, chat, key)
            assert status == 401 and is_openai_error(body, 401), (method, path, key, status, body)
    assert _no_key(guarded, "GET", "/metrics")[0] == 401           # --protect-metrics
    for path in ("/health", "/ping", "/version"):
        assert _no_key(guarded, "GET", path)[0] == 200, path
    status, _, body = raw_request(guarded, "POST", "/v1/chat/completions", chat)
    assert status == 200, body[:300]
    assert guarded.get("/v1/models").status_code == 200
    assert metrics(guarded)["factorkv_http_rejected_total"] >= 2 * len(GENERATION_ROUTES)


def test_body_limit_option(guarded):
    big = json.dumps({"model": M, "prompt": "a" * (65 << 10), "max_tokens": 1}).encode()
    status, _, body = raw_request(guarded, "POST", "/v1/completions", big)
    assert status == 413 and is_openai_error(body, 413), (status, body[:300])
    ok = json.dumps({"model": M, "prompt": "a " * 100, "max_tokens": 1}).encode()
    assert raw_request(guarded, "POST", "/v1/completions", ok)[0] == 200


def test_overload_gets_429_and_admitted_requests_complete(guarded):
    before = metrics(guarded).get("factorkv_http_rejected_total", 0)
    results = _burst(guarded, LOAD)
    statuses = Counter(r["status"] for r in results)
    assert set(statuses) <= {200, 429}, statuses
    admitted = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] == 429]
    assert len(admitted) >= MAX_NUM_SEQS + QUEUED, statuses
    assert rejected, f"no 429 at {LOAD} simultaneous requests: {statuses}"
    lost = [r for r in admitted if not r["complete"]]
    assert not lost, lost                        # every admitted request got all its tokens
    for r in rejected:
        assert r["retry_after"] and int(r["retry_after"]) >= 1
        assert is_openai_error(r["body"], 429), r["body"][:300]
    m = wait_idle(guarded, timeout=60)
    assert m["factorkv_http_rejected_total"] - before == len(rejected)
    assert m["factorkv_http_generation_in_flight"] == 0
    print(f"guarded: {LOAD} requests at once -> {len(admitted)} complete, {len(rejected)} x 429, "
          f"0 lost")
    # the server recovers: a new burst within capacity is fully served
    again = _burst(guarded, MAX_NUM_SEQS + QUEUED)
    assert all(r["status"] == 200 and r["complete"] for r in again), again


def test_sigterm_drains_in_flight_then_exits_0(guarded):
    """--shutdown-timeout 60 (vLLM's drain): SIGTERM while 2 requests generate; both finish
    with every token, a request arriving during the drain gets 503 + Retry-After, exit 0."""
    wait_idle(guarded, timeout=60)
    with ThreadPoolExecutor(2) as ex:
        futs = [ex.submit(generate, guarded, M, i, 160, bool(i % 2)) for i in range(2)]
        deadline = time.monotonic() + 60
        while metrics(guarded).get("vllm:num_requests_running", 0) < 2:
            assert time.monotonic() < deadline and not any(f.done() for f in futs)
            time.sleep(0.2)
        t0 = time.monotonic()
        guarded.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        late = generate(guarded, M, 99, 4, stream=False, timeout=30)
        results = [f.result(timeout=120) for f in futs]
    assert late["status"] == 503 and late["retry_after"], late
    assert is_openai_error(late["body"], 503)
    assert all(r["status"] == 200 and r["complete"] for r in results), results
    rc = guarded.proc.wait(timeout=90)
    took = time.monotonic() - t0
    assert rc == 0, guarded.log_tail()
    print(f"drain: 2 in-flight requests completed, exit 0 {took:.1f} s after SIGTERM")


# -- unbounded server -----------------------------------------------------------------------

def test_metrics_open_by_default_with_api_key(unbounded):
    assert _no_key(unbounded, "GET", "/metrics")[0] == 200
    assert _no_key(unbounded, "GET", "/v1/models")[0] == 401


def test_without_bound_everything_queues_and_completes(unbounded):
    peak = {"waiting": 0.0}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            try:
                w = metrics(unbounded).get("vllm:num_requests_waiting", 0)
                peak["waiting"] = max(peak["waiting"], w)
            except Exception:  # noqa: BLE001  (a sample may race the burst)
                pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        results = _burst(unbounded, LOAD)
    finally:
        stop.set()
        t.join(timeout=10)
    assert all(r["status"] == 200 and r["complete"] for r in results), \
        Counter(r["status"] for r in results)
    assert peak["waiting"] >= 1, peak            # they really queued behind max-num-seqs
    wait_idle(unbounded, timeout=60)
    print(f"unbounded: {LOAD} requests at once -> {LOAD} complete (peak waiting "
          f"{peak['waiting']:.0f}), 0 lost")


def test_engine_death_fails_health_and_exits_nonzero(unbounded):
    import psutil

    pid = unbounded.proc.pid
    group = {p.pid for p in psutil.Process(pid).children(recursive=True)}
    core = engine_core_pid(pid)
    t0 = time.monotonic()
    os.kill(core, signal.SIGKILL)
    unhealthy_after = None
    while time.monotonic() - t0 < 30 and unbounded.proc.poll() is None:
        try:
            ok = unbounded.get("/health", timeout=2).status_code == 200
        except OSError:
            ok = False
        if not ok and unhealthy_after is None:
            unhealthy_after = time.monotonic() - t0
        time.sleep(0.25)
    assert unhealthy_after is not None and unhealthy_after < 15, unhealthy_after
    rc = unbounded.proc.wait(timeout=60)
    exited_after = time.monotonic() - t0
    assert rc != 0, unbounded.log_tail()
    assert "factorkv: error: the vLLM engine process died" in unbounded.log_text()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(psutil.pid_exists(p) and
                                              psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                              for p in group):
        time.sleep(0.5)
    left = [p for p in group if psutil.pid_exists(p)
            and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not left, left
    print(f"engine killed: /health failed after {unhealthy_after:.1f} s, exit {rc} after "
          f"{exited_after:.1f} s, no processes left")


def test_cli_rejects_bad_guard_options():
    for args, needle in ((["--max-queued-requests", "-1"], "--max-queued-requests"),
                         (["--max-request-body-bytes", "lots"], "--max-request-body-bytes")):
        proc = subprocess.run([sys.executable, "-m", "server.cli", "serve", *args], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
        assert lines[0].startswith("factorkv: error:") and needle in lines[0], lines
