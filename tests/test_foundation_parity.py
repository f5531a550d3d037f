"""vLLM (through `factorkv serve`) greedy tokens == a plain-torch reference of the same
checkpoint: Hugging Face transformers for the original default model (``--variant
original``), model_patches.evaluation.tasks.TorchCausalLM for the calibrated factored build the README
path serves.

Both float32, three fixed prompts, 32 new tokens each (EOS ignored). The prompts go to the
server as token ids, so tokenisation cannot differ.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import DEFAULT_SERVED_NAME

pytestmark = pytest.mark.slow

NEW_TOKENS = 32


def _prompts(tok) -> list[list[int]]:
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Explain in one paragraph what a KV cache is."}],
        tokenize=False, add_generation_prompt=True)
    texts = ["The capital of France is",
             "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             chat]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


def _hf_greedy(model, ids: list[int], n: int):
    """Plain greedy decoding with the KV cache; also the top-2 logit gap at each step."""
    import torch

    out, gaps = [], []
    with torch.no_grad():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            logits = res.logits[0, -1]
            top2 = torch.topk(logits, 2).values
            gaps.append(float(top2[0] - top2[1]))
            nxt = int(torch.argmax(logits))
            out.append(nxt)
            res = model(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out, gaps


def _served_greedy(srv, ids):
    r = srv.post("/v1/completions", {
        "model": DEFAULT_SERVED_NAME, "prompt": ids, "max_tokens": NEW_TOKENS,
        "temperature": 0, "ignore_eos": True, "return_token_ids": True}, timeout=300)
    assert r.status_code == 200, r.text[:1000]
    return r.json()["choices"][0]["token_ids"]


def test_default_variant_greedy_matches_torch_reference(default_server, default_variant_dir):
    import torch
    from transformers import AutoTokenizer

    from engine.torch_model import TorchCausalLM
    from model_patches.evaluation.tasks import greedy

    info = default_server.get_json("/factorkv/info")
    assert info["architectures"] == ["FactoredLlamaForCausalLM"]
    tok = AutoTokenizer.from_pretrained(default_variant_dir)
    prompts = _prompts(tok)
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_served_greedy, default_server, p) for p in prompts]
        torch.set_num_threads(1)
        model = TorchCausalLM.from_dir(default_variant_dir).eval()
        with torch.no_grad():
            ref = [greedy(model, p, NEW_TOKENS) for p in prompts]
        got = [f.result() for f in futures]
    for i, (want, have) in enumerate(zip(ref, got)):
        assert have == want, (f"prompt {i}: torch {tok.decode(want)!r}\nvLLM  {tok.decode(have)!r}")


def test_vllm_greedy_matches_transformers(original_server, default_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_dir)
    prompts = _prompts(tok)

    def ask(ids):
        return _served_greedy(original_server, ids)

    # The server decodes while transformers runs here (the engine worker has its own core).
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(ask, p) for p in prompts]
        torch.set_num_threads(1)
        model = AutoModelForCausalLM.from_pretrained(default_model_dir, dtype=torch.float32)
        model.eval()
        hf = [_hf_greedy(model, p, NEW_TOKENS) for p in prompts]
        got = [f.result() for f in futures]

    for i, ((want, gaps), have) in enumerate(zip(hf, got)):
        assert len(have) == NEW_TOKENS
        if have != want:
            j = next(k for k, (a, b) in enumerate(zip(want, have)) if a != b)
            pytest.fail(f"prompt {i}: first mismatch at token {j}: HF {want[j]} "
                        f"({tok.decode([want[j]])!r}) vs vLLM {have[j]} ({tok.decode([have[j]])!r}); "
                        f"HF top-2 logit gap there {gaps[j]:.2e}\nHF:   {tok.decode(want)!r}\n"
                        f"vLLM: {tok.decode(have)!r}")
