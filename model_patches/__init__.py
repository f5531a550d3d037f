"""FactorKV model_patches package."""
