"""Evaluation: quality benchmarks of original, factored, merged and evicted models.

tasks (perplexity, passkey, chat on engine.torch_model), vllm_check (the same tasks through
the vLLM engine), quality (the `factorkv eval` benchmark: variants, run, report),
eviction_quality (the L2-norm eviction benchmark: settings, tasks, run, report) and
results_cache (per-item results on disk). Text comes from model_patches.text_sets.
"""
