"""The plain-torch eviction reference (engine.torch_model, ``forward(ids, evict=(policy, L))``)
against implementations that literally compact a KV cache after prefill and decode on it:
transformers' own Llama with a gathered DynamicCache and explicit positions, and the quality
benchmark's TorchCausalLM path (model_patches.evaluation.eviction_quality). Tiny random models, a few seconds."""

from __future__ import annotations

import pytest
import torch

from engine.eviction.policy import L2NormPolicy as EvictionPolicy
from engine.torch_model import TorchCausalLM, greedy_with_eviction
from model_patches.evaluation.eviction_quality.run import greedy_on_cache, run_on_cache
from model_patches.evaluation.eviction_quality.settings import evict_cache
from model_patches.conversion.checkpoint_writer import write_full_rank, write_rotary_pair_subset
from tests.engine_utils import tiny_gpt2, tiny_llama

SINK, WINDOW = 4, 16
TOL = 1e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("evict_ref")
    src = tiny_llama(root / "llama", heads=4, kv_heads=2)
    return {"src": src, "full": write_full_rank(src, root / "full"),
            "r8": write_rotary_pair_subset(src, root / "r8", 8)}


def _ids(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 256, (n,), generator=g).tolist()


def _hf_compacted_greedy(src, prompt: list[int], policy: EvictionPolicy, n_new: int):
    """transformers' Llama: prefill, gather each layer's cached (post-RoPE) keys/values to
    policy.select(‖k‖₂) per KV head, then decode one token at a time at logical positions."""
    from transformers import DynamicCache, LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    n = len(prompt)
    with torch.no_grad():
        out = model(torch.tensor([prompt]), use_cache=True)
        data = []
        for layer in out.past_key_values.layers:
            k, v = layer.keys[0], layer.values[0]                     # [H_kv, n, D]
            sel = policy.select(k.norm(dim=-1))                       # [H_kv, kept]
            idx = sel[..., None].expand(-1, -1, k.shape[-1])
            data.append((k.gather(1, idx)[None], v.gather(1, idx)[None]))
        cache = DynamicCache(ddp_cache_data=data)
        logits = [out.logits[0, -1]]
        toks = [int(logits[-1].argmax())]
        for j in range(1, n_new):
            o = model(torch.tensor([[toks[-1]]]), past_key_values=cache, use_cache=True,
                      position_ids=torch.tensor([[n + j - 1]]))
            cache = o.past_key_values
            logits.append(o.logits[0, -1])
            toks.append(int(logits[-1].argmax()))
    return toks, torch.stack(logits)


def test_keep_one_and_short_prompts_change_nothing(models):
    ref = TorchCausalLM.from_dir(models["full"])
    ids = torch.tensor(_ids(90, 1))
    plain = ref(ids)
    assert torch.equal(ref(ids, evict=(EvictionPolicy(keep=1.0), 60)), plain)
    # prompt no longer than sink + window: nothing evicted, whatever keep says
    short = EvictionPolicy(keep=0.1, sink=SINK, window=WINDOW)
    assert torch.equal(ref(ids, evict=(short, SINK + WINDOW)), plain)
    assert torch.equal(ref(ids, evict=(short, 7)), plain)
    # a real eviction leaves the prompt rows alone and changes the later ones
    ev = ref(ids, evict=(EvictionPolicy(keep=0.25, sink=SINK, window=WINDOW), 60))
    assert torch.equal(ev[:60], plain[:60])
    assert (ev[60:] - plain[60:]).abs().max() > 1e-2


def test_policy_edges_in_the_mask():
    k = torch.randn(50, 3, 8)
    p = EvictionPolicy(keep=0.1, sink=SINK, window=WINDOW)
    # one token more than sink + window: the single middle token goes, sink and window stay
    m = p.keep_mask(k, SINK + WINDOW + 1)
    assert m.sum(1).tolist() == [50 - 1] * 3
    assert m[:, :SINK].all() and m[:, 1 + SINK:].all() and not m[:, SINK].any()
    m = p.keep_mask(k, 40)            # 40 prompt tokens: keep max(20, 4) = 20, all later kept
    assert m[:, :40].sum(1).tolist() == [20] * 3 and m[:, 40:].all()
    m = EvictionPolicy(keep=0.75, sink=SINK, window=WINDOW).keep_mask(k, 40)     # 30 kept
    assert m[:, :40].sum(1).tolist() == [30] * 3 and m[:, :SINK].all() and m[:, 40 - WINDOW:].all()
    norms = k[:40].norm(dim=-1).T     # the kept middle tokens are the lowest-norm ones
    for h in range(3):
        kept = m[h, SINK:40 - WINDOW]
        assert norms[h, SINK:40 - WINDOW][kept].max() <= norms[h, SINK:40 - WINDOW][~kept].min()
    assert EvictionPolicy(keep=0.5, sink=0, window=0).keep_mask(k, 10).sum(1).tolist() == [45] * 3


@pytest.mark.parametrize("keep", [0.5, 0.25])
def test_reference_equals_hf_compacted_cache(models, keep):
    policy = EvictionPolicy(keep=keep, sink=SINK, window=WINDOW)
    prompt = _ids(120, 2)
    hf_toks, hf_logits = _hf_compacted_greedy(models["src"], prompt, policy, 10)
    ref = TorchCausalLM.from_dir(models["full"])
    toks, lps = greedy_with_eviction(ref, prompt, policy, 10)
    assert toks == hf_toks
    logits = ref(torch.tensor(prompt + toks), evict=(policy, len(prompt)))[len(prompt) - 1:-1]
    assert (logits - hf_logits).abs().max() < TOL
    hf_lp = torch.log_softmax(hf_logits.double(), -1)[torch.arange(10), torch.tensor(toks)]
    assert max(abs(a - b) for a, b in zip(lps, hf_lp.tolist())) < TOL
    # the eviction matters for these tokens (the test is not vacuous)
    plain = ref(torch.tensor(prompt + toks))[len(prompt):-1]
    assert (plain - logits[1:]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["full", "r8"])
def test_reference_equals_thinlm_compacted_cache(models, name):
    """The benchmark's path: prefill, evict_cache, teacher-forced chunk at logical positions."""
    policy = EvictionPolicy(keep=0.3, sink=SINK, window=WINDOW)
    ids = _ids(160, 3)
    n = 100
    ref = TorchCausalLM.from_dir(models[name])
    expect = ref(torch.tensor(ids), evict=(policy, n))
    lm = TorchCausalLM.from_dir(models[name]).eval()
    cache: list = []
    with torch.no_grad():
        pre = lm.logits(lm.hidden_states(torch.tensor([ids[:n]]), cache))[0]
    ev = evict_cache(cache, policy)
    assert ev[0][0].shape[2] == policy.num_kept(n)
    hs, _ = run_on_cache(lm, ev, ids[n:], pos0=n)
    got = torch.cat([pre, lm.logits(hs)])
    assert (got - expect).abs().max() < TOL
    # greedy decoding on the evicted cache = the reference's greedy loop
    toks, _ = greedy_with_eviction(ref, ids[:n], policy, 6)
    assert greedy_on_cache(lm, ev, n, int(pre[-1].argmax()), 6) == toks


def test_gpt2_reference_keep_one(tmp_path):
    from model_patches.conversion.checkpoint_writer import write_full_rank as full
    ref = TorchCausalLM.from_dir(full(tiny_gpt2(tmp_path / "g"), tmp_path / "gf"))
    ids = torch.tensor(_ids(80, 4))
    plain = ref(ids)
    assert torch.equal(ref(ids, evict=(EvictionPolicy(keep=1.0), 50)), plain)
    ev = ref(ids, evict=(EvictionPolicy(keep=0.5, sink=SINK, window=WINDOW), 50))
    assert torch.equal(ev[:50], plain[:50]) and (ev[50:] - plain[50:]).abs().max() > 1e-3


def test_benchmark_skip_layers_variation(models):
    """Setting(skip_layers=N): the first N layers keep their cache (per-layer cache lengths)."""
    from model_patches.evaluation.eviction_quality.settings import Setting
    policy = EvictionPolicy(keep=0.3, sink=SINK, window=WINDOW)
    ids, n = _ids(140, 5), 100
    lm = TorchCausalLM.from_dir(models["full"]).eval()
    cache: list = []
    with torch.no_grad():
        lm.hidden_states(torch.tensor([ids[:n]]), cache)
    out = {}
    for skip in (0, 1, 2):
        ev = Setting(policy, skip).evict(cache)
        assert [c[0].shape[2] for c in ev] == [n] * skip + [policy.num_kept(n)] * (2 - skip)
        out[skip] = lm.logits(run_on_cache(lm, ev, ids[n:], pos0=n)[0])
    plain = lm.logits(run_on_cache(lm, cache, ids[n:], pos0=n)[0])
    assert (out[2] - plain).abs().max() < 1e-5          # every layer skipped: no eviction
    assert (out[1] - plain).abs().max() > 1e-3 and (out[1] - out[0]).abs().max() > 1e-3
    assert Setting.parse("keep=0.5,window=32,skip=2") == Setting(EvictionPolicy(0.5, 4, 32), 2)
    assert Setting.parse("keep=0.5,order=random").key == "keep0.5-s4-w64-random"
    ev_hi = Setting(policy, 0, "high").evict(cache)
    norms_lo, norms_hi = (c[0][0].float().norm(dim=-1)[:, SINK:-WINDOW].mean() for c in
                          (Setting(policy).evict(cache)[1], ev_hi[1]))
    assert norms_lo < norms_hi


def test_per_layer_selection_is_one_set_of_tokens_by_joint_norm():
    """select_per_layer / keep_mask(per_layer=True): every head keeps the same tokens, the
    middle ones with the lowest norm of the token's keys over all heads."""
    k = torch.randn(60, 3, 8)
    p = EvictionPolicy(keep=0.5, sink=SINK, window=WINDOW)
    m = p.keep_mask(k, 50, per_layer=True)
    assert (m == m[:1]).all() and m[0, :50].sum() == p.num_kept(50) and m[:, 50:].all()
    joint = k[:50].flatten(1).norm(dim=-1)[SINK:50 - WINDOW]
    kept = m[0, SINK:50 - WINDOW]
    assert joint[kept].max() <= joint[~kept].min()
    assert torch.equal(p.select_per_layer(k[:50].transpose(0, 1)), m[0, :50].nonzero()[:, 0])
    assert not (p.keep_mask(k, 50) == m).all()           # per head differs on random keys


def test_latent_reference_selects_per_layer_and_benchmark_can_too(tmp_path):
    """The plain-torch model evicts latent keys per layer (what the engine does), and the
    benchmark's Setting(select='layer') compacts a dense cache the same way."""
    from model_patches.evaluation.eviction_quality.settings import Setting
    from tests.engine_utils import write_latent
    lm = TorchCausalLM.from_dir(write_latent(tiny_llama(tmp_path / "src"), tmp_path / "lat", 8, 1))
    policy = EvictionPolicy(keep=0.4, sink=SINK, window=WINDOW)
    ids, n = _ids(130, 7), 100
    masked = lm(torch.tensor(ids), evict=(policy, n))[n - 1:-1]
    cache: list = []
    with torch.no_grad():
        last = lm.hidden_states(torch.tensor([ids[:n]]), cache)
        per_layer = Setting(policy, select="layer")
        assert per_layer.key.endswith("-per-layer") and Setting.parse(
            "keep=0.4,window=16,select=layer") == per_layer
        hs = run_on_cache(lm, per_layer.evict(cache), ids[n:-1], pos0=n)[0]
        per_head = lm.logits(run_on_cache(lm, Setting(policy).evict(cache), ids[n:-1], pos0=n)[0])
    compacted = torch.cat([lm.logits(last[0, -1:]), lm.logits(hs)])
    assert (compacted - masked).abs().max() < 1e-4
    assert (per_head - compacted[1:]).abs().max() > 1e-3
