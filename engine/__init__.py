"""FactorKV engine package."""
