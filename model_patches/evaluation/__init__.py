"""Evaluation: quality benchmarks of original, factored, merged and evicted models.

text_sets (held-out/calibration text), tasks (perplexity, passkey, chat), vllm_check (the
same tasks through the vLLM engine), quality (the `factorkv eval` benchmark) and
eviction_quality (the L2-norm eviction benchmark).
"""
