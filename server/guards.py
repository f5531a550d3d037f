"""HTTP guards in front of vLLM's OpenAI app: access, body size, bad JSON, overload, error shape.

`factorkv serve` wraps vLLM's app in :class:`GuardMiddleware` (outermost, just inside
Starlette's ServerErrorMiddleware) with :func:`install_guards`. Contract, per request:

1. **Access** (only when an API key is set, ``--api-key`` or ``VLLM_API_KEY``): every
   path needs ``Authorization: Bearer <key>`` except :data:`OPEN_PATHS` (health and
   liveness probes, version, API docs) and ``/metrics`` unless ``--protect-metrics``.
   vLLM's own check covers only ``/v1``, ``/v2``, ``/inference``, ``/cohere``; this also
   closes ``/invocations``, ``/tokenize``, ``/factorkv/*`` ... → 401.
2. **Overload** (``--max-queued-requests N``): at most ``max_num_seqs + N`` generation
   requests (:data:`GENERATION_PATHS`) in flight, counted from arrival until the response
   (or stream) ends or the client leaves; one more → 429 with ``Retry-After``. Never
   touches a request that was admitted.
3. **Body** (POST/PUT/PATCH): more than ``--max-request-body-bytes`` → 413 (checked on
   Content-Length and while reading); a non-multipart body that is not UTF-8 or has the
   non-JSON constants ``NaN``/``Infinity`` → 400.
4. **Error shape**: a 4xx JSON answer that is not OpenAI-shaped (FastAPI's ``{"detail":
   ...}``, vLLM's ``{"error": "Unauthorized"}``) is rewritten to
   ``{"error": {"message", "type", "param", "code"}}`` (vLLM's own shape). vLLM's 501
   (a feature the model does not have, e.g. ``/v1/systemone``) becomes 400: the client
   asked for something this server cannot do; the server is not broken.
5. **Draining**: once vLLM starts shutting the engine down (SIGTERM; with
   ``--shutdown-timeout S`` it drains the requests in flight for up to S seconds), new
   generation requests get 503 with ``Retry-After`` instead of vLLM's 500.

Rejections are counted in ``factorkv_http_rejected_total{reason}``; the generation
requests in flight are the gauge ``factorkv_http_generation_in_flight``.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any

from starlette.middleware import Middleware

from server.errors import CLIError
from server.sizes import size_arg

#: POST routes that start a generation (they count towards --max-queued-requests).
GENERATION_PATHS = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages",
    "/v1/chat/completions/batch", "/invocations", "/inference/v1/generate",
})
#: Paths that stay open when an API key is set (probes and API docs).
OPEN_PATHS = frozenset({"/health", "/ping", "/load", "/version", "/openapi.json", "/docs",
                        "/docs/oauth2-redirect", "/redoc"})
DEFAULT_MAX_BODY_BYTES = 16 << 20
RETRY_AFTER_SECONDS = 1


def add_arguments(group) -> None:
    """Add the guard options to an argparse group of `factorkv serve`."""
    group.add_argument(
        "--max-queued-requests", type=int, default=None, metavar="N",
        help="admit at most max-num-seqs + N generation requests at once; more get HTTP 429 "
             "with Retry-After (None: unbounded, vLLM queues everything)")
    group.add_argument(
        "--max-request-body-bytes", type=size_arg, default=DEFAULT_MAX_BODY_BYTES,
        metavar="SIZE", help="largest request body in bytes or a size such as 16MiB; larger "
                             "get HTTP 413; 0 = no limit")
    group.add_argument(
        "--protect-metrics", action="store_true",
        help="with --api-key, GET /metrics needs the key too (otherwise it is open, like "
             "/health)")


def check_arguments(args) -> None:
    """Raise CLIError (one line) for bad guard options."""
    if args.max_queued_requests is not None and args.max_queued_requests < 0:
        raise CLIError(f"--max-queued-requests must be 0 or more, got {args.max_queued_requests}")
    if args.max_request_body_bytes < 0:
        raise CLIError(f"--max-request-body-bytes must be 0 or more, got {args.max_request_body_bytes}")


@dataclass
class GuardConfig:
    max_in_flight: int | None = None      # generation requests admitted at once (None: no cap)
    max_body_bytes: int | None = None     # None or 0: no limit
    api_keys: list[str] = field(default_factory=list)
    protect_metrics: bool = False
    kv_evict: bool = False                # server started with --kv-evict


class _Stats:
    def __init__(self):
        self.in_flight = 0
        self.draining = False
        self.rejected = {"overload": 0, "body_too_large": 0, "unauthorized": 0, "bad_body": 0,
                         "shutting_down": 0}

    def collect(self):
        # prometheus_client (~0.1 s) only when scraped: this module is on every CLI command's path.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        c = CounterMetricFamily("factorkv_http_rejected", "HTTP requests rejected by "
                                "FactorKV's guards", labels=["reason"])
        for reason, n in self.rejected.items():
            c.add_metric([reason], float(n))
        yield c
        g = GaugeMetricFamily("factorkv_http_generation_in_flight",
                              "generation requests admitted and not yet answered")
        g.add_metric([], float(self.in_flight))
        yield g


def error_body(status: int, message: str, param: str | None = None) -> bytes:
    """vLLM's OpenAI-style error JSON."""
    return json.dumps({"error": {"message": message, "type": HTTPStatus(status).phrase,
                                 "param": param, "code": status}}).encode()


async def _send_error(send, status: int, message: str, headers: dict[str, str] | None = None):
    body = error_body(status, message)
    hdrs = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    hdrs += [(k.encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": body})


class _NonFinite(ValueError):
    pass


def _reject_constant(name: str):
    raise _NonFinite(name)


def body_problem(body: bytes) -> str | None:
    """Why a JSON request body is unacceptable before vLLM sees it, or None."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"request body is not valid UTF-8 (byte {e.start})"
    if b"NaN" in body or b"Infinity" in body:
        try:
            json.loads(body, parse_constant=_reject_constant)
        except _NonFinite as e:
            return f"request body has {e}, which is not valid JSON (numbers must be finite)"
        except (ValueError, RecursionError):
            return None  # malformed JSON: vLLM reports it
    return None


def eviction_problem(body: bytes, enabled: bool) -> str | None:
    """Why a request's ``vllm_xargs.kv_evict_keep`` is unacceptable, or None."""
    if b"kv_evict_keep" not in body:
        return None
    try:
        xargs = json.loads(body).get("vllm_xargs") or {}
    except (ValueError, RecursionError, AttributeError):
        return None  # malformed JSON: vLLM reports it
    if not isinstance(xargs, dict) or "kv_evict_keep" not in xargs:
        return None
    if not enabled:
        return "vllm_xargs.kv_evict_keep needs a server started with --kv-evict"
    from engine.eviction.policy import EvictionConfigError
    from server.kv_evict_arg import check_request_keep

    try:
        check_request_keep(xargs["kv_evict_keep"])
    except EvictionConfigError as e:
        return f"vllm_xargs.kv_evict_keep: {str(e).removeprefix('kv-evict: ')}"
    return None


class GuardMiddleware:
    """Pure ASGI middleware implementing the module contract."""

    def __init__(self, app, config: GuardConfig, stats: _Stats | None = None):
        self.app = app
        self.config = config
        self.stats = stats or _Stats()
        self._keys = [hashlib.sha256(k.encode()).digest() for k in config.api_keys]

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                if scheme.lower() == "bearer":
                    digest = hashlib.sha256(token.strip().encode()).digest()
                    return any(secrets.compare_digest(digest, k) for k in self._keys)
        return False

    def _needs_key(self, path: str, method: str) -> bool:
        if not self._keys or method == "OPTIONS" or path in OPEN_PATHS:
            return False
        if path.startswith("/metrics"):
            return self.config.protect_metrics
        return True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
        method = scope["method"]
        if self._needs_key(path, method) and not self._authorized(scope):
            self.stats.rejected["unauthorized"] += 1
            return await _send_error(send, 401, "invalid or missing API key (send "
                                     "'Authorization: Bearer <key>')",
                                     {"www-authenticate": "Bearer"})
        counted = method == "POST" and path in GENERATION_PATHS
        if counted and self.stats.draining:
            self.stats.rejected["shutting_down"] += 1
            return await _send_error(send, 503, "the server is shutting down; retry on another "
                                     "instance", {"retry-after": str(RETRY_AFTER_SECONDS),
                                                  "connection": "close"})
        if counted:
            cap = self.config.max_in_flight
            if cap is not None and self.stats.in_flight >= cap:
                self.stats.rejected["overload"] += 1
                return await _send_error(
                    send, 429, f"the server is at capacity ({cap} generation requests in "
                    "flight); retry later", {"retry-after": str(RETRY_AFTER_SECONDS)})
            self.stats.in_flight += 1
        try:
            if method in ("POST", "PUT", "PATCH"):
                receive = await self._checked_body(scope, receive, send)
                if receive is None:
                    return
            await self.app(scope, receive, send if method == "HEAD" else _ErrorShaper(send))
        finally:
            if counted:
                self.stats.in_flight -= 1

    async def _checked_body(self, scope, receive, send):
        """Read the whole body (bounded); answer 4xx and return None if it is refused,
        else return a receive() that replays it, then passes on the client's messages."""
        limit = self.config.max_body_bytes or None
        headers = dict(scope.get("headers", ()))
        try:
            declared = int(headers.get(b"content-length", b"-1"))
        except ValueError:
            declared = -1
        too_big = f"request body exceeds the server's limit of {limit} bytes"
        if limit is not None and declared > limit:
            self.stats.rejected["body_too_large"] += 1
            await _send_error(send, 413, too_big, {"connection": "close"})
            return None
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return None
            chunk = msg.get("body", b"")
            size += len(chunk)
            if limit is not None and size > limit:
                self.stats.rejected["body_too_large"] += 1
                await _send_error(send, 413, too_big, {"connection": "close"})
                return None
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        if body and not headers.get(b"content-type", b"").lower().startswith(b"multipart/"):
            problem = body_problem(body) or eviction_problem(body, self.config.kv_evict)
            if problem:
                self.stats.rejected["bad_body"] += 1
                await _send_error(send, 400, problem)
                return None
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # then http.disconnect when the client goes away

        return replay


class _ErrorShaper:
    """send() wrapper: rewrites non-OpenAI-shaped 4xx JSON bodies (other answers pass)."""

    def __init__(self, send):
        self.send = send
        self.start: dict[str, Any] | None = None
        self.parts: list[bytes] = []

    async def __call__(self, msg):
        if msg["type"] == "http.response.start":
            hdrs = dict(msg.get("headers", ()))
            status = msg["status"]
            if (400 <= status < 500 or status == 501) and hdrs.get(
                    b"content-type", b"").startswith(b"application/json"):
                self.start = {**msg, "status": 400 if status == 501 else status}
                return None
            return await self.send(msg)
        if self.start is None or msg["type"] != "http.response.body":
            return await self.send(msg)
        self.parts.append(msg.get("body", b""))
        if msg.get("more_body", False):
            return None
        status, body = self.start["status"], b"".join(self.parts)
        body = _reshape(status, body)
        hdrs = [(k, v) for k, v in self.start.get("headers", ()) if k != b"content-length"]
        hdrs.append((b"content-length", str(len(body)).encode()))
        await self.send({**self.start, "headers": hdrs})
        await self.send({"type": "http.response.body", "body": body})


def _reshape(status: int, body: bytes) -> bytes:
    try:
        data = json.loads(body)
    except ValueError:
        return body
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        if data["error"].get("code") != status:  # 501 -> 400
            data["error"]["code"] = status
            return json.dumps(data).encode()
        return body
    detail = data.get("detail", data.get("error", data)) if isinstance(data, dict) else data
    if not isinstance(detail, str):
        detail = json.dumps(detail)[:2000]
    return error_body(status, detail)


def install_guards(app, args, engine_client) -> None:
    """Wrap ``app`` (before it serves) according to the parsed `factorkv serve` args."""
    import vllm.envs as envs  # vLLM: only when serving (CLI start-up time)

    keys = [k for k in (args.api_key or [envs.VLLM_API_KEY]) if k]
    max_in_flight = None
    if args.max_queued_requests is not None:
        max_in_flight = engine_client.vllm_config.scheduler_config.max_num_seqs + \
            args.max_queued_requests
    config = GuardConfig(max_in_flight=max_in_flight, max_body_bytes=args.max_request_body_bytes,
                         api_keys=keys, protect_metrics=args.protect_metrics,
                         kv_evict=getattr(args, "kv_evict", None) is not None)
    stats = _Stats()
    # vLLM's app has already built its middleware stack (SageMaker bootstrap), so
    # add_middleware() refuses: put ours first (outermost) and rebuild, as vLLM does.
    app.user_middleware.insert(0, Middleware(GuardMiddleware, config=config, stats=stats))
    app.middleware_stack = app.build_middleware_stack()
    shutdown = engine_client.shutdown

    def shutdown_and_refuse_new(*a, **kw):
        stats.draining = True  # vLLM's SIGTERM handler calls this first (in a thread)
        return shutdown(*a, **kw)

    engine_client.shutdown = shutdown_and_refuse_new
    try:
        from vllm.v1.metrics.prometheus import get_prometheus_registry  # as envs above

        get_prometheus_registry().register(stats)
    except ValueError:  # already registered (a second app in one process)
        pass
