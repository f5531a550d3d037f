"""The load client of the goodput benchmark: one GuideLLM run per (server, N users).

GuideLLM (``guidellm run``, a pinned PyPI package) drives the traffic; this module writes
its scenario, runs it as a subprocess, and turns its JSON report plus two scrapes of the
server's Prometheus ``/metrics`` into one point of the sweep.

The scenario: N conversations (``data_loader.samples = N``) on N streams (``profile
kind=concurrent``), so exactly N simulated users are in the system at once, each a chat of
``turns`` turns: a system prompt shared by all users (``prefix_tokens``, one prefix), a
user-specific first message (``first_prompt_tokens``, e.g. a document the user asks
about), then short questions (``prompt_tokens``), answers of exactly ``answer_tokens``
tokens (``max_completion_tokens`` + ``ignore_eos``), and a think time between a turn's
answer and the next question (``delay``). Every turn sends the whole history, with the
model's real answers, as chat messages, so the history grows turn by turn and the server
can serve it from its prefix cache while the cache still holds it. Users join spread over
``rampup_per_user × N`` seconds. The run stops once every conversation has finished, or
at ``max_duration`` (requests still running then are counted as cut).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtests.metrics import counter_delta, percentile, prefix_cache_hit_rate, scrape

#: chat-template tokens per message (ChatML "<|im_start|>role\n ... <|im_end|>\n")
TEMPLATE_TOKENS_PER_MESSAGE = 6


@dataclass(frozen=True)
class Workload:
    turns: int = 6
    system_tokens: int = 128
    history_tokens: int = 256       # the user's first message
    question_tokens: int = 64       # every later message
    answer_tokens: int = 24
    think_time: float = 2.0         # s between an answer and the next question
    rampup_per_user: float = 3.0    # users join over rampup_per_user × N seconds

    def max_context(self) -> int:
        """Tokens of the last turn's prompt plus its answer."""
        messages = 1 + 2 * self.turns
        return (self.system_tokens + self.history_tokens + (self.turns - 1) * self.question_tokens
                + self.turns * self.answer_tokens + messages * TEMPLATE_TOKENS_PER_MESSAGE)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 2500.0
    tpot_ms: float = 500.0
    attainment: float = 0.9         # share of a point's requests that must meet both


def scenario(url: str, model: str, tokenizer: str, users: int, wl: Workload, slo: SLO,
             max_duration: float, out_json: Path, api_key: str | None = None) -> dict:
    """A GuideLLM scenario (``guidellm run -c FILE``) for N users of ``wl``."""
    data = {"kind": "synthetic_text", "turns": wl.turns, "prefix_count": 1,
            "prefix_tokens": wl.system_tokens, "first_prompt_tokens": wl.history_tokens,
            "prompt_tokens": wl.question_tokens, "output_tokens": wl.answer_tokens}
    if wl.think_time > 0:
        data["delay"] = wl.think_time
    backend = {"kind": "openai_http", "target": url, "model": model,
               "request_format": "/v1/chat/completions"}
    if api_key:
        backend["api_key"] = api_key
    return {"metadata": {"name": f"factorkv-goodput-{users}"}, "spec": {
        "backend": backend,
        "profile": {"kind": "concurrent", "streams": users,
                    "rampup_duration": wl.rampup_per_user * users},
        "data": [data],
        "data_loader": {"kind": "pytorch", "samples": users},
        "tokenizer": {"kind": "huggingface_auto", "model": tokenizer},
        "constraints": [{"kind": "max_duration", "seconds": max_duration}],
        "metrics": {"kind": "generative", "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms}},
        "outputs": [{"kind": "json", "path": str(out_json)}],
    }}


def run_guidellm(scenario_file: Path, log_file: Path, timeout: float) -> None:
    """``guidellm run -c scenario_file`` (offline, one worker process); raises with the log's
    tail when it fails."""
    env = {**os.environ, "GUIDELLM__MAX_WORKER_PROCESSES": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log_file, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "guidellm", "run", "-c", str(scenario_file),
                               "--disable-console-interactive"],
                              stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"guidellm exited with status {proc.returncode}; {log_file}:\n{tail}")


def read_report(path: Path, expected: int) -> dict:
    """The numbers of one GuideLLM benchmark (its JSON report) that the sweep keeps;
    ``expected``: the requests its conversations hold (users × turns)."""
    bench = json.loads(path.read_text())["benchmarks"][0]
    reqs, metrics = bench["requests"], bench["metrics"]
    ok = reqs["successful"]
    recorded = len(ok) + len(reqs["errored"]) + len(reqs["incomplete"])
    ttft = [r["time_to_first_token_ms"] / 1000 for r in ok if r.get("time_to_first_token_ms")]
    tpot = [r["inter_token_latency_ms"] / 1000 for r in ok if r.get("inter_token_latency_ms")]
    follow = [r["time_to_first_token_ms"] / 1000 for r in ok
              if r["info"].get("turn_index") and r.get("time_to_first_token_ms")]
    by_turn: dict[int, list[dict]] = {}
    for r in ok:
        by_turn.setdefault(r["info"].get("turn_index") or 0, []).append(r)
    good = (metrics.get("request_goodput") or {}).get("successful") or {}
    return {
        "requests": recorded, "failed": len(reqs["errored"]), "cut": len(reqs["incomplete"]),
        "dropped": max(0, expected - recorded),
        "conversations": len({r["info"]["conversation_id"] for r in ok}),
        "duration_s": bench["duration"],
        "output_tokens": sum(r["output_tokens"] or 0 for r in ok),
        "mean_prompt_tokens": sum(r["prompt_tokens"] or 0 for r in ok) / len(ok) if ok else 0.0,
        "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
        "followup_ttft_p50": percentile(follow, 50), "followup_ttft_p99": percentile(follow, 99),
        "tpot_p50": percentile(tpot, 50), "tpot_p99": percentile(tpot, 99),
        "ttft_p99_by_turn": [percentile([r["time_to_first_token_ms"] / 1000 for r in by_turn[t]], 99)
                             for t in sorted(by_turn)],
        "prompt_tokens_by_turn": [round(sum(r["prompt_tokens"] or 0 for r in by_turn[t]) / len(by_turn[t]))
                                  for t in sorted(by_turn)],
        "attainment": metrics.get("slo_attainment"),
        "goodput": good.get("mean", 0.0),
        "errors": sorted({str(r["info"].get("error"))[:200] for r in reqs["errored"]})[:5],
    }


def run_point(url: str, model: str, tokenizer: str, users: int, wl: Workload, slo: SLO,
              max_duration: float, work_dir: Path, api_key: str | None = None) -> dict:
    """N users against the server at ``url``: GuideLLM's numbers, the server's prefix-cache
    hit rate and preemptions over the run, and whether the point meets the SLO."""
    work_dir.mkdir(parents=True, exist_ok=True)
    out_json, spec = work_dir / f"guidellm-{users}.json", work_dir / f"scenario-{users}.json"
    spec.write_text(json.dumps(scenario(url, model, tokenizer, users, wl, slo, max_duration,
                                        out_json, api_key), indent=1))
    for attempt in range(2):
        before = scrape(url, api_key)
        run_guidellm(spec, work_dir / f"guidellm-{users}.log", timeout=max_duration + 300)
        after = scrape(url, api_key)
        point = {"users": users, "attempts": attempt + 1,
                 **read_report(out_json, users * wl.turns)}
        if not point["dropped"] or point["cut"]:
            break       # GuideLLM 0.8.1 now and then never sends a conversation's last turn: once more
    point["prefix_hit_rate"] = prefix_cache_hit_rate(before, after)
    point["preemptions"] = counter_delta(before, after, "vllm:num_preemptions_total")
    point["prefilled_tokens"] = (counter_delta(before, after, "vllm:prompt_tokens_total")
                                 - counter_delta(before, after, "vllm:prefix_cache_hits_total"))
    point["meets_slo"] = bool(point["failed"] == 0 and point["cut"] == 0 and point["attainment"] is not None
                              and point["attainment"] >= slo.attainment)
    return point


def describe(wl: Workload, slo: SLO) -> dict:
    return {"workload": asdict(wl), "slo": asdict(slo), "max_context": wl.max_context()}
