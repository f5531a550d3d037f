"""Conversion: ordinary Hugging Face checkpoints -> factored / merged checkpoints.

convert (the entry point), thin_init (data-aware initialisation), head_merge (MHA -> GQA),
calibrate (layer-wise and end-to-end calibration), calibration_data, checkpoint_writer,
default_model (the packaged SmolLM2) and default_variants (its shipped factored builds).
"""
