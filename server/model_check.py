"""Pre-flight checks of a model directory, run before vLLM starts.

vLLM's own failures on a bad model path surface as long tracebacks from a child
process after several seconds; these checks read only ``config.json`` and the
safetensors headers and raise :class:`~server.errors.CLIError` with one line.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from server.errors import CLIError
from server.sizes import format_size

WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model(model: str) -> Path:
    """A local directory for ``model``: an existing path, or a hub id already in the
    local Hugging Face cache (nothing is downloaded). One-line CLIError otherwise."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if _HUB_ID.fullmatch(model) and not model.startswith("."):
        try:
            from huggingface_hub import snapshot_download  # only for hub ids (import is slow)

            return Path(snapshot_download(model, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached / hub lib missing: same message
            pass
    raise CLIError(f"model path {model} does not exist "
                   "(give a local model directory, or omit --model to serve the default model)")


def check_model_dir(path: Path, *, need_tokenizer: bool = True) -> dict:
    """Validate a Hugging Face model directory; returns its parsed config.json."""
    if not path.is_dir():
        raise CLIError(f"model path {path} is not a directory")
    from engine.checkpoint import read_config  # torch: see _check_factored

    cfg_file = path / "config.json"
    cfg = read_config(path, CLIError)
    if not (cfg.get("architectures") or cfg.get("model_type")):
        raise CLIError(f"{cfg_file} names no architectures or model_type")

    weights = [p for g in WEIGHT_GLOBS for p in sorted(path.glob(g))]
    if not weights:
        raise CLIError(f"model path {path} has no weights (*.safetensors, *.bin or *.pt)")
    _check_safetensors(path, [p for p in weights if p.suffix == ".safetensors"])

    if need_tokenizer and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CLIError(f"model path {path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                       "pass --tokenizer PATH")

    _check_factored(path)
    return cfg


def _check_safetensors(path: Path, files: list[Path]) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CLIError(f"{index} is not a valid safetensors index ({_one_line(e)})") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise CLIError(f"{index} lists missing shard(s): {', '.join(missing[:3])}")
    for f in files:
        _check_safetensors_file(f)


def _check_safetensors_file(f: Path) -> None:
    """Header sanity without loading tensors: JSON header whose offsets fit the file."""
    size = f.stat().st_size
    try:
        with open(f, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise ValueError("file too short")
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size or n > 100 * 2**20:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = 0
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            end = max(end, int(meta["data_offsets"][1]))
        if 8 + n + end > size:
            raise ValueError(f"truncated: needs {8 + n + end} bytes, has {size}")
    except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
        raise CLIError(f"{f} is not a valid safetensors file ({_one_line(e)})") from None


def _check_factored(path: Path):
    """Factored (thin-key) checkpoints: the engine's own pre-flight check.
    Returns its FactoredKeysConfig (None for an ordinary model)."""
    # engine.checkpoint imports torch: keep `factorkv --help` and the other commands fast.
    from engine.checkpoint import validate_checkpoint_dir

    try:
        return validate_checkpoint_dir(path)
    except ValueError as e:
        raise CLIError(_one_line(e)) from None


_MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length",
                 "max_sequence_length")


def kv_bytes_per_token(path: Path, cfg: dict, dtype: str) -> int | None:
    """KV cache bytes per token (all layers, :mod:`engine.kv_layout`) for plain decoder
    configs and factored checkpoints; None when the layout is not one this formula covers
    or the dtype is not known (vLLM's ``auto``)."""
    from engine.kv_layout import KVLayout, find_dtype_bytes  # torch: see _check_factored

    nbytes = find_dtype_bytes(dtype)
    if nbytes is None:
        return None
    text = cfg.get("text_config") or {}
    if text or cfg.get("sliding_window") or cfg.get("layer_types") or cfg.get("kv_lora_rank"):
        return None  # multimodal / sliding-window / hybrid / MLA: leave it to vLLM
    fk = _check_factored(path)
    if fk is not None:
        return KVLayout.of_factored(fk, dtype).bytes_per_token
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    kv_heads = cfg.get("num_key_value_heads") or heads
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else None)
    if not all(isinstance(v, int) and v > 0 for v in (layers, kv_heads, head_dim)):
        return None
    return KVLayout.unfactored(layers, kv_heads, head_dim, nbytes).bytes_per_token


def check_latent_groups(cfg: dict, tp: int) -> None:
    """Latent keys: a joint latent is read by all the KV heads of its group, so each
    tensor-parallel rank must hold whole groups."""
    block = cfg.get("factored_keys") or {}
    if tp <= 1 or block.get("key_mode") != "latent":
        return
    from engine.checkpoint import latent_groups_fit

    kv = cfg.get("num_key_value_heads") or cfg.get("num_attention_heads") or 0
    groups = block.get("latent_groups", 1)
    if not latent_groups_fit(kv, groups, tp):
        raise CLIError(f"--tensor-parallel-size {tp}: this latent-key checkpoint shares one "
                       f"latent among {kv // groups} of its {kv} KV heads, which would span "
                       f"ranks; convert with --latent-groups a multiple of {tp}")


def config_max_len(cfg: dict) -> int | None:
    if cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {}).get("rope_type", "default") != "default":
        return None
    lens = [cfg[k] for k in _MAX_LEN_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    return min(lens) if lens else None


def check_kv_budget(path: Path, cfg: dict, *, budget: int, dtype: str, max_model_len: int | None,
                    block_size: int) -> None:
    """One-line error when ``budget`` bytes cannot hold one ``max_model_len`` sequence
    (vLLM would fail the same way, but from its engine process, with a traceback)."""
    from engine.kv_layout import blocks_in_budget  # torch: see _check_factored

    if max_model_len is not None and max_model_len <= 0:
        return  # -1 / "auto": vLLM fits the length to the memory
    per_token = kv_bytes_per_token(path, cfg, dtype)
    given = max_model_len is not None
    max_len = max_model_len if given else config_max_len(cfg)
    if per_token is None or max_len is None:
        return
    per_block = per_token * block_size
    # vLLM's block pool keeps one block back (the null block), as its own check does.
    fits = max(blocks_in_budget(budget, block_size, per_token) - 1, 0) * block_size
    if fits >= max_len:
        return
    need = (-(-max_len // block_size) + 1) * per_block
    if fits < block_size:
        raise CLIError(f"--kv-cache-memory {format_size(budget)} is too small: it must hold at "
                       f"least two KV blocks of {block_size} tokens x {per_token} bytes "
                       f"({format_size(2 * per_block)})")
    what = "--max-model-len" if given else "the model's max length"
    raise CLIError(f"--kv-cache-memory {format_size(budget)} fits requests of at most {fits} "
                   f"tokens ({per_token} bytes/token in {dtype}) but {what} is {max_len}; "
                   f"give --kv-cache-memory {format_size(need)} or more, "
                   f"or --max-model-len {fits} or less")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] + ("..." if len(text) > 300 else "")
