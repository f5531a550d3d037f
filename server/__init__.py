"""FactorKV server package."""
