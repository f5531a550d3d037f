"""vLLM plugin entry point (`vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API server, engine core,
workers), so it is idempotent and cheap: it registers the thin-key CPU attention
backend by name and the factored model architectures by lazy class path.
"""

_REGISTERED = False

MODELS = {
    "FactoredLlamaForCausalLM": "engine.models.factored_llama:FactoredLlamaForCausalLM",
    "FactoredGPT2LMHeadModel": "engine.models.factored_gpt2:FactoredGPT2LMHeadModel",
}


def register() -> None:
    """Register FactorKV model architectures and attention backends with vLLM."""
    global _REGISTERED
    if _REGISTERED:
        return
    from vllm import ModelRegistry
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    from engine.attention.cpu_backend import BACKEND_NAME
    from engine.attention.latent_backend import BACKEND_NAME as LATENT_BACKEND_NAME

    for name, path in ((BACKEND_NAME, "engine.attention.cpu_backend.ThinKeyCPUBackend"),
                       (LATENT_BACKEND_NAME, "engine.attention.latent_backend.LatentKeyBackend")):
        if name not in AttentionBackendEnum._member_map_:
            register_backend(name, path)
    supported = set(ModelRegistry.get_supported_archs())
    for arch, path in MODELS.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, path)
    _REGISTERED = True
