"""Test-side name of :mod:`loadtests.server_process` (start a real `factorkv serve`
on 127.0.0.1 and stop it); the benchmarks in loadtests/ use the same helper."""

from loadtests.server_process import (  # noqa: F401
    DEFAULT_START_TIMEOUT,
    REPO,
    ServerError,
    ServerProcess,
    free_port,
    running_server,
)
