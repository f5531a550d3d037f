"""FactorKV loadtests package."""
