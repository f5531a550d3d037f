"""Start a real `factorkv serve` process (tests, benchmarks) and tear it down cleanly.

    from loadtests.server_process import ServerProcess, running_server

    with running_server("--model", str(ckpt_dir), "--kv-cache-memory", "256MiB") as srv:
        client = openai.OpenAI(base_url=srv.openai_base_url, api_key="EMPTY")
        info = srv.get_json("/factorkv/info")          # KV capacity etc.
        text = srv.get("/metrics").text                 # raw HTTP helpers

The server binds 127.0.0.1 on a free port, its stdout+stderr go to a log file
(``srv.log_path``; ``srv.log_tail()``), start-up waits for ``GET /health`` == 200
and fails with the log tail if the process dies or the timeout passes. It runs in
its own process group (vLLM starts an engine-core and a worker process), so
``stop()`` can end the whole group: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_START_TIMEOUT = float(os.environ.get("FACTORKV_TEST_START_TIMEOUT", "300"))


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerError(RuntimeError):
    """The server died or did not become healthy in time (message ends with its log tail)."""


class _Response:
    def __init__(self, status: int, body: bytes, headers: Mapping[str, str]):
        self.status_code = status
        self.content = body
        self.headers = dict(headers)

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self):
        return json.loads(self.content)


class ServerProcess:
    """A `factorkv serve` subprocess on 127.0.0.1:<free port>.

    ``args``: extra `factorkv serve` arguments (anything vLLM or FactorKV accepts).
    ``env``: extra environment variables (merged over os.environ).
    ``api_key``: if given, passed as --api-key and used by get()/post()/openai_client().
    """

    def __init__(self, args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
                 start_timeout: float = DEFAULT_START_TIMEOUT, api_key: str | None = None,
                 log_dir: str | os.PathLike | None = None, host: str = "127.0.0.1"):
        self.args = [str(a) for a in args]
        self.env = dict(env or {})
        self.start_timeout = start_timeout
        self.api_key = api_key
        self.host = host
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self._log_dir = Path(log_dir) if log_dir else None
        self.log_path: Path | None = None
        self.startup_seconds: float | None = None

    # -- addresses -------------------------------------------------------------
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        return f"{self.base_url}/v1"

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    # -- lifecycle -------------------------------------------------------------
    def command(self) -> list[str]:
        return [sys.executable, "-m", "server.cli", "serve", "--host", self.host,
                "--port", str(self.port), *(["--api-key", self.api_key] if self.api_key else []),
                *self.args]

    def start(self) -> ServerProcess:
        """Start and wait for /health 200 (retries on a port race). Raises ServerError."""
        for attempt in range(3):
            self.port = free_port(self.host)
            self._spawn()
            try:
                self.wait_ready()
                return self
            except ServerError:
                tail = self.log_tail(40)
                self.stop()
                if "cannot listen" in tail and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        log_dir = self._log_dir or Path(tempfile.mkdtemp(prefix="factorkv-server-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"server-{self.port}.log"
        env = {**os.environ, **self.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Only ever talk to the local machine: no hub look-ups, no usage stats.
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_NO_USAGE_STATS", "1")
        env.setdefault("VLLM_DO_NOT_TRACK", "1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.command(), cwd=str(REPO), env=env,
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self._t0 = time.monotonic()

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            rc = self.proc.poll()
            if rc is not None:
                raise ServerError(f"factorkv serve exited with status {rc} before /health "
                                  f"was ready; log {self.log_path}:\n{self.log_tail()}")
            try:
                if self.get("/health", timeout=2).status_code == 200:
                    self.startup_seconds = time.monotonic() - self._t0
                    return
            except OSError:
                pass
            time.sleep(0.25)
        raise ServerError(f"factorkv serve did not answer /health within "
                          f"{timeout or self.start_timeout:.0f} s; log {self.log_path}:\n"
                          f"{self.log_tail()}")

    def stop(self, grace: float = 30.0) -> int | None:
        """SIGTERM the server, wait ``grace`` s, then SIGKILL its process group."""
        proc = self.proc
        if proc is None:
            return None
        try:
            pgid = os.getpgid(proc.pid)
        except ProcessLookupError:
            pgid = None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
        # The engine-core / worker children share the group: make sure none outlive us.
        if pgid is not None and pgid == proc.pid:
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and _group_alive(pgid):
                time.sleep(0.2)
            if _group_alive(pgid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pgid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        rc = proc.wait(timeout=10)
        self.proc = None
        return rc

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- inspection --------------------------------------------------------------
    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace") if self.log_path else ""
        except OSError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- HTTP helpers (stdlib only) ---------------------------------------------
    def request(self, method: str, path: str, body=None, *, timeout: float = 120,
                headers: Mapping[str, str] | None = None) -> _Response:
        data = None
        hdrs = dict(headers or {})
        if self.api_key:
            hdrs.setdefault("Authorization", f"Bearer {self.api_key}")
        if body is not None:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url(path), data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return _Response(r.status, r.read(), r.headers)
        except urllib.error.HTTPError as e:
            return _Response(e.code, e.read(), e.headers)

    def get(self, path: str, **kw) -> _Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body, **kw) -> _Response:
        return self.request("POST", path, body, **kw)

    def get_json(self, path: str, **kw):
        r = self.get(path, **kw)
        if r.status_code != 200:
            raise AssertionError(f"GET {path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def openai_client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.openai_base_url, api_key=self.api_key or "EMPTY",
                             max_retries=0, timeout=kw.pop("timeout", 300), **kw)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


@contextlib.contextmanager
def running_server(*args: str, env: Mapping[str, str] | None = None,
                   start_timeout: float = DEFAULT_START_TIMEOUT, api_key: str | None = None,
                   log_dir: str | os.PathLike | None = None) -> Iterator[ServerProcess]:
    """``with running_server("--model", path, ...) as srv:`` — started, healthy, then stopped."""
    srv = ServerProcess(args, env=env, start_timeout=start_timeout, api_key=api_key, log_dir=log_dir)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
