"""The Triton latent-key decode kernel on a GPU: checked against its torch reference at real
shapes, then timed against dense full-key attention of the same batch and context.

    python3 -m loadtests.triton_latent_bench --out DIR         # a CUDA machine: torch, Triton
    python -m loadtests.triton_latent_bench --smoke --out DIR  # CPU, TRITON_INTERPRET=1, tiny

Per (model shape, batch n, context T), one decode step of one layer:

* latent: `engine.attention.triton_latent.latent_decode` over a paged cache [NB, H_kv, BS, r + D]
  (shuffled block table, every sequence T tokens), with its default flash-decoding split, with
  one run per sequence (splits = 1), and with tf32 (tensor-core) dots instead of fp32;
* dense: `torch.nn.functional.scaled_dot_product_attention` of the same queries over contiguous
  full keys and values [n, H_kv, T, D] (GQA), the cache an unmodified model would read.

Bytes a step must read: latent n·T·H_kv·(r + D)·e, dense n·T·H_kv·2D·e (e bytes an element):
at r = D/4 the latent cache is 0.625 of the dense one, and its extra work is arithmetic,
n·T·H_kv·D·r_g multiply-adds to rebuild the keys (r_g = r·H_kv / groups). The report gives
times, the bandwidth each reaches, and latent / dense. Correctness: max |kernel − reference|
on the first sequences of every point (the reference in float32).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

# (H, H_kv, D, r per KV head, latent groups): the default model, and a Llama-3-8B-like layer
# with a joint latent and with per-head latents
SHAPES = {"smollm2-135m": (9, 3, 64, 16, 1),
          "llama8b-joint": (32, 8, 128, 32, 1),
          "llama8b-perhead": (32, 8, 128, 32, 8)}
BLOCK_SIZE = 16
CHECK_SEQS = 4
TOLERANCE = 2e-2   # bf16 cache and queries, fp32 accumulation


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--batches", default="1,8,32,128")
    p.add_argument("--contexts", default="512,2048,8192")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="report directory")
    p.add_argument("--splits", type=int, default=None,
                   help="split-K runs of the first latent column (default: default_splits)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU under TRITON_INTERPRET=1: tiny shapes, one batch and context")
    args = p.parse_args(argv)
    try:
        args.shapes = [s for s in args.shapes.split(",") if s]
        bad = [s for s in args.shapes if s not in SHAPES]
        if bad:
            raise ValueError(f"unknown shape {bad[0]!r}")
        args.batches = [int(x) for x in args.batches.split(",")]
        args.contexts = [int(x) for x in args.contexts.split(",")]
    except ValueError as e:
        p.error(str(e))
    if args.smoke:
        args.shapes, args.batches, args.contexts = ["smollm2-135m"], [2], [40]
        args.splits = args.splits or 3
    return args


def rope_tables(max_pos: int, d: int, base: float = 10000.0):
    """cos, sin [max_pos, D] (float32) of the default rotary table, both halves alike."""
    import torch
    inv_freq = base ** (-torch.arange(0, d, 2).double() / d)
    ang = torch.arange(max_pos).double()[:, None] * inv_freq[None, :]
    emb = torch.cat([ang, ang], -1)
    return emb.cos().float(), emb.sin().float()


def make_inputs(shape, n: int, t: int, dtype, device, seed: int = 0):
    """Random q, paged latent cache (shuffled blocks), up, rope tables; and the dense K, V."""
    import torch
    h, h_kv, d, r, groups = shape
    r_g = h_kv // groups * r
    g = torch.Generator(device).manual_seed(seed)

    def randn(*size):
        return torch.randn(*size, generator=g, device=device).to(dtype)
    nblk = math.ceil(t / BLOCK_SIZE)
    perm = torch.randperm(n * nblk, generator=torch.Generator().manual_seed(seed))
    cos, sin = rope_tables(t, d)
    args = dict(q=randn(n, h, d), kv_cache=randn(n * nblk, h_kv, BLOCK_SIZE, r + d),
                block_table=perm.view(n, nblk).to(torch.int32).to(device),
                seq_lens=torch.full((n,), t, dtype=torch.int32, device=device),
                up=randn(h_kv, d, r_g).float() / math.sqrt(r_g),
                cos=cos.to(device), sin=sin.to(device),
                scale=d ** -0.5, groups=groups)
    return args, randn(n, h_kv, t, d), randn(n, h_kv, t, d)


def timer(fn, device) -> float:
    """Median milliseconds of fn(): Triton's do_bench on CUDA, wall clock otherwise."""
    if device.type == "cuda":
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=25, rep=100))
    fn()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(name: str, shape, n: int, t: int, device, dtype, splits: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F
    from engine.attention.triton_latent import (default_splits, latent_decode,
                                                latent_decode_reference)
    h, h_kv, d, r, groups = shape
    args, dk, dv = make_inputs(shape, n, t, dtype, device)
    if splits is None:
        splits = default_splits(n, h_kv, args["block_table"].shape[1], device)
    out = latent_decode(**args, num_splits=splits)
    k = min(n, CHECK_SEQS)
    sub = dict(args, q=args["q"][:k], block_table=args["block_table"][:k],
               seq_lens=args["seq_lens"][:k])
    ref = latent_decode_reference(**sub)
    err = (out[:k].float() - ref.float()).abs().max().item()
    one = latent_decode(**args, num_splits=1)
    err_one = (one[:k].float() - ref.float()).abs().max().item()
    tf32 = latent_decode(**args, num_splits=splits, precision="tf32")
    err_tf32 = (tf32[:k].float() - ref.float()).abs().max().item()
    qd = args["q"][:, :, None]                                           # [n, H, 1, D]

    def dense():
        return F.scaled_dot_product_attention(qd, dk, dv, scale=args["scale"],
                                              enable_gqa=h != h_kv)
    ms_latent = timer(lambda: latent_decode(**args, num_splits=splits), device)
    ms_one = timer(lambda: latent_decode(**args, num_splits=1), device)
    ms_tf32 = timer(lambda: latent_decode(**args, num_splits=splits, precision="tf32"), device)
    ms_dense = timer(dense, device)
    e = torch.tensor([], dtype=dtype).element_size()
    bytes_latent = n * t * h_kv * (r + d) * e
    bytes_dense = n * t * h_kv * 2 * d * e
    row = {"shape": name, "H": h, "H_kv": h_kv, "D": d, "r": r, "groups": groups,
           "batch": n, "context": t, "splits": splits, "max_abs_err": err,
           "max_abs_err_splits1": err_one, "max_abs_err_tf32": err_tf32,
           "ms_latent": ms_latent, "ms_latent_splits1": ms_one, "ms_latent_tf32": ms_tf32,
           "ms_dense": ms_dense, "latent_over_dense": ms_latent / ms_dense,
           "tf32_over_dense": ms_tf32 / ms_dense,
           "GBps_latent": bytes_latent / ms_latent / 1e6,
           "GBps_dense": bytes_dense / ms_dense / 1e6,
           "rebuild_GMACs": n * t * h_kv * d * (h_kv // groups * r) / 1e9}
    print(f"{name:16s} n={n:4d} T={t:5d} splits={splits:2d}  latent {ms_latent:8.3f} ms "
          f"(1 run {ms_one:8.3f}, tf32 {ms_tf32:8.3f})  dense {ms_dense:8.3f} ms  "
          f"ratio {row['latent_over_dense']:.2f}"
          f"  err {err:.1e}", flush=True)
    return row


def write_report(out: Path, rows: list[dict], device_name: str, dtype_name: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton-latent.json").write_text(json.dumps(
        {"device": device_name, "dtype": dtype_name, "rows": rows}, indent=1))
    lines = ["# Triton latent-key decode vs dense attention", "",
             f"Device: {device_name}; cache and queries {dtype_name}, fp32 accumulation; one "
             f"layer, one decode step; block size {BLOCK_SIZE}. `python3 -m "
             "loadtests.triton_latent_bench` (loadtests/triton_latent_bench.py states the method).",
             "", "| shape | batch | context | splits | latent ms | 1 run ms | tf32 ms | dense ms "
             "| latent / dense | tf32 / dense | latent GB/s | dense GB/s | max abs err (fp32, "
             "tf32) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        err = max(r["max_abs_err"], r["max_abs_err_splits1"])
        lines.append(f"| {r['shape']} | {r['batch']} | {r['context']} | {r['splits']} | "
                     f"{r['ms_latent']:.3f} | {r['ms_latent_splits1']:.3f} | "
                     f"{r['ms_latent_tf32']:.3f} | {r['ms_dense']:.3f} | "
                     f"{r['latent_over_dense']:.2f} | {r['tf32_over_dense']:.2f} | "
                     f"{r['GBps_latent']:.0f} | {r['GBps_dense']:.0f} | "
                     f"{err:.1e}, {r['max_abs_err_tf32']:.1e} |")
    path = out / "triton-latent.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton.jit decorates the kernel
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        print("triton_latent_bench: no CUDA device (use --smoke for the CPU interpreter run)",
              file=sys.stderr)
        return 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = [measure(s, SHAPES[s], n, t, device, dtype, args.splits)
            for s in args.shapes for t in args.contexts for n in args.batches]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (interpreter)"
    path = write_report(Path(args.out), rows, name, str(dtype).removeprefix("torch."))
    bad = [r for r in rows if max(r["max_abs_err"], r["max_abs_err_splits1"],
                                  r["max_abs_err_tf32"]) > TOLERANCE]
    print(f"report: {path}; {len(rows) - len(bad)}/{len(rows)} points within {TOLERANCE}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
