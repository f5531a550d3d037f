"""Quality of L2-norm KV eviction on the default model (`make bench-eviction-quality`).

    python -m model_patches.evaluation.eviction_quality [--keeps 0.5,0.25,0.1] [--sink 4] [--window 64]
        [--extra keep=0.5,skip=2] [--extra keep=0.5,order=random] [--extra-tasks ppl,niah2048]

Eviction (engine/eviction/policy.py, the same as the engine and engine.torch_model): a prompt of
L tokens is prefilled with full causal attention; then per layer and KV head only the keys
``policy.select(policy.score(k))`` (L2NormPolicy: the lowest ‖k‖₂; and their values) stay in the
cache; later tokens attend to those plus every token after the prompt, at their logical RoPE
positions. Here the cache is compacted literally (:func:`settings.evict_cache`) and later tokens
run on it (engine.torch_model ``TorchCausalLM`` with ``pos0``);
tests/test_eviction_reference.py checks this against ``engine.torch_model`` and transformers.

Metrics (plain batched torch, float32), written between the quality markers of
docs/results/eviction.md:

* **perplexity**, sliding windows of 2048 held-out Wikipedia tokens (model_patches.text_sets,
  evaluation split) at stride 1024: the first 1024 tokens are the evicted prompt, the last 1024
  are scored teacher-forced on the evicted cache (the first of them is predicted by the
  prompt's last row, which eviction cannot change);
* **needle in a haystack** at 2k / 4k tokens: real held-out text, a fact sentence
  (" <name>'s favourite <thing> is <value>.") at a random sentence boundary, a question at the
  end, greedy answer, exact match of the value;
* **passkey** at 2k / 4k (model_patches.evaluation.tasks.passkey_prompts, extract_passkey).

Retrieval is scored in two modes: *context* (the default, stricter): the prompt that is
evicted is everything before the question; the question is fed afterwards on the evicted
cache, so every answer token depends on the kept keys; *engine*: the question is part of the
evicted prompt (what ``factorkv serve --kv-evict`` does to one request); the first answer token
then comes from the prefill and only the later ones see the evicted cache.

Per-item results are cached in ``~/.cache/factorkv/eviction/results.json`` (keyed by the
settings and the checkpoint fingerprint): an interrupted or repeated run only computes what is
missing.

Modules: ``settings`` (a benchmark setting: a policy plus controls, applied to a dense cache),
``tasks`` (perplexity windows, needle and passkey prompts), ``run`` (the compute loop on the
evicted cache, with its per-item result cache), ``report`` (tables, targets, plot, markdown),
``__main__`` (the command line).
"""
