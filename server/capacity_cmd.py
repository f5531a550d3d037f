"""`factorkv capacity`: KV memory per user and users per device for any HF config.

Uses :mod:`engine.kv_layout`, the code path behind the live server's gauges:

    users = floor(KV memory / KV bytes per user),
    KV memory = gpu_memory · utilization − weights (estimated from the config's shapes,
                or --weights-memory),
    KV bytes per user = ceil(context / block) · block · bytes/token.

``--model`` takes a model directory, a config.json, or one of the built-in shape presets
(:data:`PRESETS`, the public config.json values of those models, for machines without
a hub). An unfactored model is shown as is and factored at each ``--key-rank`` (what-if);
a factored checkpoint is shown next to its unfactored baseline.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from server.errors import CLIError
from server.sizes import size_arg

HELP = "KV memory per user and users per device for a model at a context length"

#: Attention shapes of well-known models (their published config.json values).
PRESETS: dict[str, dict] = {
    "llama-2-7b": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       hidden_size=4096, intermediate_size=11008, vocab_size=32000),
    "mistral-7b": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       hidden_size=4096, intermediate_size=14336, vocab_size=32000),
    "llama-3-8b": dict(num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       hidden_size=4096, intermediate_size=14336, vocab_size=128256),
    "smollm2-135m": dict(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         hidden_size=576, intermediate_size=1536, vocab_size=49152,
                         tie_word_embeddings=True),
}


def load_config(model: str) -> tuple[str, dict]:
    """(name, config dict) of a preset, a model directory, or a config.json file."""
    if model.lower() in PRESETS:
        return model.lower(), dict(PRESETS[model.lower()])
    path = Path(model).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise CLIError(f"--model {model!r} is neither a model directory, a config.json nor a "
                       f"preset ({', '.join(PRESETS)})")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CLIError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise CLIError(f"{path} is not a JSON object")
    return path.parent.name, cfg


DESCRIPTION = ("Print KV bytes per token and per user, and how many users of a given "
               "context fit on one device, for a model (factored or not) and its "
               "unfactored baseline. Presets: " + ", ".join(PRESETS) + ".")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH|PRESET",
                   help="model directory, config.json, or a preset name")
    p.add_argument("--context", type=int, default=131072, metavar="TOKENS",
                   help="tokens per user (prompt + output), default 131072")
    p.add_argument("--gpu-memory", type=size_arg, default=size_arg("80GiB"), metavar="SIZE",
                   help="device memory, default 80GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9, metavar="F",
                   help="fraction of device memory vLLM may use (default 0.9)")
    p.add_argument("--weights-memory", type=size_arg, default=None, metavar="SIZE",
                   help="memory of weights + activations (default: estimated from the config)")
    p.add_argument("--dtype", default="fp16", help="weight dtype (default fp16)")
    p.add_argument("--kv-dtype", default="fp16", help="KV cache dtype: fp16, bf16, fp8, fp32")
    p.add_argument("--key-rank", type=int, action="append", metavar="R",
                   help="also show the model factored to rank R (repeatable; default D/2 and D/4 "
                        "for an unfactored model)")
    p.add_argument("--block-size", type=int, default=16, help="KV block size (vLLM GPU default 16)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def capacity_rows(cfg: dict, *, context: int, gpu_memory: int, utilization: float,
                  weights_memory: int | None, dtype: str, kv_dtype: str,
                  key_ranks: list[int] | None, block_size: int) -> list[dict]:
    """One row per variant: the model itself, its baseline or its factored what-ifs."""
    # engine.kv_layout imports torch: loaded only when this command runs (`factorkv --help` stays fast)
    from engine.kv_layout import KVCapacity, dtype_bytes, kv_layout, weight_bytes_estimate

    layout = kv_layout(cfg, kv_dtype)
    weights = weights_memory if weights_memory is not None else weight_bytes_estimate(cfg, dtype_bytes(dtype))
    kv_memory = int(gpu_memory * utilization) - weights
    if kv_memory <= 0:
        raise CLIError(f"weights ({weights / 2**30:.1f} GiB) leave no KV memory in "
                       f"{gpu_memory / 2**30:.1f} GiB × {utilization}")
    base = layout.with_key_rank(layout.head_dim) if layout.factored else layout
    variants = [("baseline (unfactored)", base)]
    if layout.factored:
        variants.append(("this checkpoint", layout))
    for r in key_ranks if key_ranks is not None else ([] if layout.factored else
                                                      [layout.head_dim // 2, layout.head_dim // 4]):
        variants.append((f"factored r={r}", layout.with_key_rank(r)))
    base_cap = KVCapacity.from_memory(base, kv_memory, block_size)
    rows = []
    for name, lay in variants:
        cap = KVCapacity.from_memory(lay, kv_memory, block_size)
        per_user = cap.bytes_per_user(context)
        users = math.floor(cap.users(context))
        rows.append({
            "variant": name, "key_dims": lay.key_dims[0] if len(set(lay.key_dims)) == 1 else list(lay.key_dims),
            "key_cache_cut": lay.key_cache_cut, "bytes_per_token": lay.bytes_per_token,
            "bytes_per_user": per_user,
            "saved_per_user": base_cap.bytes_per_user(context) - per_user,
            "kv_memory": kv_memory, "weights_memory": weights, "users": users,
            "gain": cap.users(context) / base_cap.users(context) if base_cap.users(context) else math.inf,
        })
    return rows


def format_table(name: str, cfg: dict, rows: list[dict], args: argparse.Namespace) -> str:
    from engine.checkpoint import model_dims  # torch: only when this command runs

    layers, heads, kv_heads, head_dim, _ = model_dims(cfg)
    gib = 2 ** 30
    head = (f"{name}: {layers} layers, {heads} query heads, {kv_heads} KV heads, head_dim {head_dim}; "
            f"context {args.context} tokens, KV {args.kv_dtype}; device {args.gpu_memory / gib:.0f} GiB "
            f"× {args.gpu_memory_utilization} − weights {rows[0]['weights_memory'] / gib:.1f} GiB "
            f"= {rows[0]['kv_memory'] / gib:.1f} GiB KV")
    lines = [head, "",
             f"{'variant':<24}{'key dims':>9}{'key cut':>9}{'KV B/token':>12}{'KV GiB/user':>13}"
             f"{'saved GiB/user':>16}{'users':>7}{'gain':>7}"]
    for r in rows:
        lines.append(f"{r['variant']:<24}{str(r['key_dims']):>9}{r['key_cache_cut']:>9.1%}"
                     f"{r['bytes_per_token']:>12,}{r['bytes_per_user'] / gib:>13.2f}"
                     f"{r['saved_per_user'] / gib:>16.2f}{r['users']:>7}{r['gain']:>6.2f}x")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from engine.checkpoint import FactoredCheckpointError  # torch: only when this command runs

    if args.context < 1:
        raise CLIError(f"--context must be at least 1, got {args.context}")
    if not 0 < args.gpu_memory_utilization <= 1:
        raise CLIError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.block_size < 1:
        raise CLIError(f"--block-size must be at least 1, got {args.block_size}")
    name, cfg = load_config(args.model)
    try:
        rows = capacity_rows(cfg, context=args.context, gpu_memory=args.gpu_memory,
                             utilization=args.gpu_memory_utilization,
                             weights_memory=args.weights_memory, dtype=args.dtype,
                             kv_dtype=args.kv_dtype, key_ranks=args.key_rank,
                             block_size=args.block_size)
    except (ValueError, TypeError, FactoredCheckpointError) as e:
        raise CLIError(str(e)) from None
    if args.json:
        print(json.dumps({"model": name, "context": args.context, "rows": rows}, indent=2))
    else:
        print(format_table(name, cfg, rows, args))
    return 0
