"""vLLM plugin entry point (`vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API server, engine core,
workers), so it must be idempotent and cheap.
"""

_REGISTERED = False


def register() -> None:
    """Register FactorKV model architectures and attention backends with vLLM."""
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
