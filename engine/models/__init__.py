"""vLLM model classes for factored (thin-key) checkpoints."""
