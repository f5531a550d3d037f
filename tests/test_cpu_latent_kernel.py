"""The C++ latent-key decode kernel (engine/attention/csrc/paged_decode.cpp) against the torch
reference of the paged latent attention (triton_latent.latent_decode_reference, itself checked
against a literal per-token loop in test_triton_latent.py): joint and per-head latents, block
sizes 5/16/32, lengths 1 to several blocks, unused cache slots NaN, head dims 16 (any-D path),
64 and 128 (compiled-D paths), and per-KV-head rotary tables."""

from __future__ import annotations

import pytest
import torch

from tests.test_triton_latent import CASES, make_case

pytestmark = pytest.mark.slow          # first use compiles the extension (~1 min on 2 cores)

NO_POS = torch.empty(0, dtype=torch.int32)       # key positions = cache slots


@pytest.fixture(scope="module")
def kernels():
    from engine.attention.cpu_kernels import decode_kernels
    mod = decode_kernels()
    if mod is None:
        pytest.skip("the C++ decode kernels could not be built (no compiler)")
    return mod


def cpp_args(args: dict, per_head_tables: bool = False) -> tuple:
    """The reference's arguments in the kernel's layout: up_t [H_kv, r_g, D], cos/sin
    [P, H_kv, D] with rotate_half's sign folded into sin."""
    h_kv, d = args["kv_cache"].shape[1], args["q"].shape[-1]
    cos = args["cos"][:, None].expand(-1, h_kv, -1).contiguous()
    sin = args["sin"][:, None].expand(-1, h_kv, -1).contiguous()
    if per_head_tables:        # a different (arbitrary) table per KV head
        g = torch.Generator().manual_seed(5)
        cos, sin = torch.rand(cos.shape, generator=g), torch.rand(sin.shape, generator=g)
    sign = torch.cat((-torch.ones(d // 2), torch.ones(d // 2)))
    up_t = args["up"].transpose(1, 2).contiguous()
    return up_t, cos, sin, (sin * sign).contiguous()


def reference(args: dict, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """latent_decode_reference, one KV head at a time when the tables differ per head."""
    from engine.attention.triton_latent import latent_decode_reference
    out = torch.empty_like(args["q"])
    h, h_kv = args["q"].shape[1], args["kv_cache"].shape[1]
    per = h // h_kv
    for kv in range(h_kv):
        full = latent_decode_reference(**dict(args, cos=cos[:, kv], sin=sin[:, kv]))
        out[:, kv * per:(kv + 1) * per] = full[:, kv * per:(kv + 1) * per]
    return out


FP32 = [n for n, c in CASES.items() if c.get("kv_dtype", torch.float32) == torch.float32]
WIDE = {"d64_joint_bs16": dict(h=9, h_kv=3, groups=1, bs=16, lens=[1, 16, 70], d=64, r=16),
        "d128_perhead_bs32": dict(h=4, h_kv=2, groups=2, bs=32, lens=[3, 65], d=128, r=8)}


@pytest.mark.parametrize("name", FP32 + list(WIDE))
@pytest.mark.parametrize("per_head_tables", [False, True])
def test_cpp_latent_decode_matches_reference(kernels, name, per_head_tables):
    case = {**CASES, **WIDE}[name]
    args = make_case(**case)
    up_t, cos, sin, signed_sin = cpp_args(args, per_head_tables)
    out = torch.full_like(args["q"], float("nan"))
    kernels.latent_decode(args["q"], args["kv_cache"], args["block_table"], args["seq_lens"],
                          up_t, cos, signed_sin, args.get("key_pos", NO_POS), args["groups"], out,
                          args["scale"])
    ref = reference(args, cos, sin)       # evicted cases: both rotate at args["key_pos"]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_cpp_latent_decode_rejects_a_short_rotary_table(kernels):
    args = make_case(h=6, h_kv=3, groups=1, bs=4, lens=[9])
    up_t, cos, _, sin = cpp_args(args)
    with pytest.raises(RuntimeError, match="rotary table shorter"):
        kernels.latent_decode(args["q"], args["kv_cache"], args["block_table"], args["seq_lens"],
                              up_t, cos[:5], sin[:5], NO_POS, 1, torch.empty_like(args["q"]),
                              1.0)


def test_cpp_latent_decode_reads_key_positions(kernels):
    """After a compacting eviction, slot t of request b holds the token at key_pos[b, t]; the
    kernel rotates each rebuilt key there (reference: latent_decode_reference(key_pos=...))."""
    from engine.attention.triton_latent import latent_decode_reference
    from tests.test_triton_latent import rope_tables
    args = make_case(h=6, h_kv=3, groups=1, bs=4, lens=[6, 9, 1], seed=3)
    args["cos"], args["sin"] = rope_tables(40, args["q"].shape[-1])
    up_t, cos, _, signed_sin = cpp_args(args)
    g = torch.Generator().manual_seed(4)
    pos = torch.stack([torch.randperm(40, generator=g)[:11].sort().values for _ in range(3)])
    pos = pos.to(torch.int32)
    out = torch.empty_like(args["q"])
    kernels.latent_decode(args["q"], args["kv_cache"], args["block_table"], args["seq_lens"],
                          up_t, cos, signed_sin, pos, 1, out, args["scale"])
    ref = latent_decode_reference(**args, key_pos=pos)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    plain = latent_decode_reference(**args)
    assert (out - plain).abs().max() > 1e-2          # the positions matter
    with pytest.raises(RuntimeError, match="shorter than the key positions"):
        kernels.latent_decode(args["q"], args["kv_cache"], args["block_table"],
                              args["seq_lens"], up_t, cos[:30], signed_sin[:30], pos, 1, out, 1.0)
