"""Attention backends that read a paged cache of r-dim keys and D-dim values."""
