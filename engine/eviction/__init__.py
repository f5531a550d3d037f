"""L2-norm KV token eviction (docs/eviction.md)."""
