"""Schemathesis hooks for tests/test_robustness_http.py (loaded via SCHEMATHESIS_HOOKS).

The fuzzer also sends *valid* generation requests; on a 2-core CPU a valid request with
no token limit (it runs to the end of the 2048-token context) or with n=16384 takes
minutes. Only the size of valid work is capped, per operation: its output-token limit is
set to <= 4 when absent, null or larger, and n/best_of to <= 2. Invalid values (negative,
NaN, wrong types) are left alone, so the server's own validation is still exercised;
oversized values are covered by the explicit cases in test_robustness_http.py.

To get past the model check into sampling/prompt validation, every other request (chosen
by a CRC of its body, so runs repeat) names the served model ($FACTORKV_FUZZ_MODEL).
"""

from __future__ import annotations

import json
import os
import zlib

import schemathesis

CAP_TOKENS, CAP_N = 4, 2
#: operation path -> the fields that bound its output
LIMIT_FIELDS = {
    "/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
    "/v1/chat/completions/batch": ("max_tokens", "max_completion_tokens"),
    "/v1/completions": ("max_tokens",),
    "/invocations": ("max_tokens", "max_completion_tokens"),
    "/v1/responses": ("max_output_tokens",),
    "/v1/messages": ("max_tokens",),
}
OTHER_TOKEN_FIELDS = ("min_tokens",)
COUNT_FIELDS = ("n", "best_of")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def cap(path: str, body) -> None:
    """Clamp the valid work a request body asks for (in place)."""
    if not isinstance(body, dict):
        return
    fields = LIMIT_FIELDS.get(path, ())
    for key in fields:
        v = body.get(key)
        if v is None or (_is_int(v) and v > CAP_TOKENS):
            body[key] = CAP_TOKENS
    for key in OTHER_TOKEN_FIELDS:
        if _is_int(body.get(key)) and body[key] > CAP_TOKENS:
            body[key] = CAP_TOKENS
    for key in COUNT_FIELDS:
        if _is_int(body.get(key)) and body[key] > CAP_N:
            body[key] = CAP_N
    if path == "/v1/completions" and isinstance(body.get("prompt"), list) and \
            len(body["prompt"]) > 2 and not all(_is_int(t) for t in body["prompt"]):
        body["prompt"] = body["prompt"][:2]  # a batch of prompts
    if path == "/v1/chat/completions/batch" and isinstance(body.get("messages"), list):
        body["messages"] = body["messages"][:2]


def name_model(body) -> None:
    model = os.environ.get("FACTORKV_FUZZ_MODEL")
    if model and isinstance(body, dict) and (body.get("model") is None or
                                             isinstance(body["model"], str)):
        if zlib.crc32(json.dumps(body, sort_keys=True, default=str).encode()) % 2:
            body["model"] = model


@schemathesis.hook
def before_call(context, case, kwargs):
    path = case.operation.path
    name_model(case.body)
    cap(path, case.body)
    if kwargs.get("json") is not case.body:
        cap(path, kwargs.get("json"))
