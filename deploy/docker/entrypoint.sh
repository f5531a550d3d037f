#!/usr/bin/env bash
# FactorKV container entrypoint.
#
# Turns FACTORKV_* environment variables into `factorkv serve` flags, then appends the
# container's arguments (the image CMD, or whatever follows the image name in
# `docker run IMAGE ...` / the Kubernetes `args:`), so flags always win over env vars:
#
#   exec factorkv serve --host $FACTORKV_HOST --port $FACTORKV_PORT [env flags] [$FACTORKV_EXTRA_ARGS] "$@"
#
# If the first argument is not a flag (does not start with "-"), it is run as a command
# instead, e.g. `docker run IMAGE factorkv prepare` or `docker run -it IMAGE bash`.
#
# FACTORKV_ENTRYPOINT_DRY_RUN=1 prints the command line (one NUL-terminated word each)
# instead of running it; tests/test_deploy.py parses it with the real argument parser.
#
# Variable                          -> flag (unset or empty: flag left out, CLI default)
#   FACTORKV_HOST (0.0.0.0)         -> --host
#   FACTORKV_PORT (8000)            -> --port
#   FACTORKV_MODEL                  -> --model   (default: the prepared SmolLM2-135M-Instruct)
#   FACTORKV_SERVED_MODEL_NAME      -> --served-model-name
#   FACTORKV_KV_CACHE_MEMORY        -> --kv-cache-memory   (e.g. 4GiB; the KV budget)
#   FACTORKV_MAX_NUM_SEQS           -> --max-num-seqs
#   FACTORKV_MAX_MODEL_LEN          -> --max-model-len
#   FACTORKV_DTYPE                  -> --dtype
#   FACTORKV_TENSOR_PARALLEL_SIZE   -> --tensor-parallel-size
#   FACTORKV_PIPELINE_PARALLEL_SIZE -> --pipeline-parallel-size
#   FACTORKV_SHUTDOWN_TIMEOUT       -> --shutdown-timeout  (seconds to drain on SIGTERM)
#   FACTORKV_ENFORCE_EAGER=1        -> --enforce-eager
#   FACTORKV_EXTRA_ARGS             -> appended as-is (split on whitespace)
#   FACTORKV_API_KEY                -> exported as VLLM_API_KEY (read by vLLM's API-key
#                                      middleware; kept off the command line and out of `ps`)
set -euo pipefail

if [[ $# -gt 0 && "$1" != -* ]]; then
    exec "$@"
fi

args=(serve --host "${FACTORKV_HOST:-0.0.0.0}" --port "${FACTORKV_PORT:-8000}")

flag() {  # flag ENV_NAME --flag : add "--flag $ENV_NAME" when the variable is non-empty
    local value="${!1:-}"
    if [[ -n "$value" ]]; then
        args+=("$2" "$value")
    fi
}
flag FACTORKV_MODEL --model
flag FACTORKV_SERVED_MODEL_NAME --served-model-name
flag FACTORKV_KV_CACHE_MEMORY --kv-cache-memory
flag FACTORKV_MAX_NUM_SEQS --max-num-seqs
flag FACTORKV_MAX_MODEL_LEN --max-model-len
flag FACTORKV_DTYPE --dtype
flag FACTORKV_TENSOR_PARALLEL_SIZE --tensor-parallel-size
flag FACTORKV_PIPELINE_PARALLEL_SIZE --pipeline-parallel-size
flag FACTORKV_SHUTDOWN_TIMEOUT --shutdown-timeout

case "${FACTORKV_ENFORCE_EAGER:-0}" in
    1 | true | yes) args+=(--enforce-eager) ;;
esac

if [[ -n "${FACTORKV_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<<"$FACTORKV_EXTRA_ARGS"
    args+=("${extra[@]}")
fi
args+=("$@")

if [[ -n "${FACTORKV_API_KEY:-}" && -z "${VLLM_API_KEY:-}" ]]; then
    export VLLM_API_KEY="$FACTORKV_API_KEY"
fi

if [[ "${FACTORKV_ENTRYPOINT_DRY_RUN:-0}" == 1 ]]; then
    printf '%s\0' factorkv "${args[@]}"
    exit 0
fi
exec factorkv "${args[@]}"
