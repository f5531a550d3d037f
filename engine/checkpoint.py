"""The `factored_keys` block of a factored checkpoint's config.json: built, parsed, validated.

See docs/checkpoint-format.md. `FactoredKeysConfig` is the one type of the block:
everything that reads a factored checkpoint (the vLLM models, the plain-torch reference,
the metrics, the CLI's pre-flight check) goes through `FactoredKeysConfig.from_hf_config`,
so a malformed checkpoint fails the same way everywhere: one `FactoredCheckpointError`
line naming the field or tensor. Everything that writes one (the converters, the
calibration, the default-model variants) builds it with `FactoredKeysConfig.build`, derives
changed copies with `dataclasses.replace` (it is frozen) and serialises it with `to_block`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

FORMAT_VERSION = 1
BLOCK = "factored_keys"
LLAMA_ARCH = "FactoredLlamaForCausalLM"
GPT2_ARCH = "FactoredGPT2LMHeadModel"
FACTORED_ARCHS = (LLAMA_ARCH, GPT2_ARCH)
REQUIRED_FIELDS = ("format_version", "key_rank", "head_dim", "rotary_inv_freq", "method",
                   "source_model")
# Optional metadata objects, written after the fields above when present.
METADATA_FIELDS = ("kv_head_merge", "calibration")
# key_mode (docs/checkpoint-format.md); absent in older checkpoints = "thin".
KEY_MODES = ("thin", "latent")


class FactoredCheckpointError(ValueError):
    """A factored checkpoint is inconsistent; the message is one line naming the field."""


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    if isinstance(cfg, dict):
        return cfg.get(name, default)
    return getattr(cfg, name, default)


def read_config(path: str | Path, error: type[Exception] | None = None) -> dict:
    """config.json of a model directory as a dict; a missing, unreadable or non-object file
    raises ``error`` (default FactoredCheckpointError) with a one-line message."""
    error = error or FactoredCheckpointError
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise error(f"{path}: no config.json (not a Hugging Face model directory)")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        msg = " ".join(str(e).split())
        raise error(f"{cfg_file} is not valid JSON ({msg})") from None
    if not isinstance(cfg, dict):
        raise error(f"{cfg_file} is not a JSON object")
    return cfg


def model_dims(hf_config: Any) -> tuple[int, int, int, int, int]:
    """(num_layers, num_heads, num_kv_heads, head_dim, hidden) of a Llama- or GPT-2-style config."""
    layers = _get(hf_config, "num_hidden_layers", None) or _get(hf_config, "n_layer")
    heads = _get(hf_config, "num_attention_heads", None) or _get(hf_config, "n_head")
    hidden = _get(hf_config, "hidden_size", None) or _get(hf_config, "n_embd")
    kv_heads = _get(hf_config, "num_key_value_heads", None) or heads
    head_dim = _get(hf_config, "head_dim", None) or hidden // heads
    return int(layers), int(heads), int(kv_heads), int(head_dim), int(hidden)


@dataclass(frozen=True)
class FactoredKeysConfig:
    """Validated factored-keys block (immutable: a calibrated config is a new object,
    `dataclasses.replace(fk, ...)`).

    ranks[l]         thin key dims r_l of layer l (per KV head)
    head_dim         D, the value / original head dim
    softmax_scale    multiplies q·k (the original model's, normally D**-0.5)
    inv_freq[l]      float64 tensor [num_kv_heads, r_l/2] (None when the model has no RoPE)
    kv_head_merge    the KV head merge the keys were factored after (head_merge), or None
    calibration      the calibration report (calibrate), or None
    key_mode         "thin" or "latent" (KEY_MODES)
    latent_groups    latent mode: G independent latents per layer, each shared by
                     num_kv_heads / G consecutive KV heads (1 = one joint latent)

    Latent mode: ranks[l] = cached key dims per KV head (the H_kv·r_l-dim latent, r_l per
    slot); inv_freq[l] = the full-width [num_kv_heads, head_dim/2] table of the rebuilt keys.
    """

    ranks: tuple[int, ...]
    head_dim: int
    num_heads: int
    num_kv_heads: int
    softmax_scale: float
    inv_freq: tuple[torch.Tensor, ...] | None
    rotary_attention_scaling: float
    method: str
    source_model: str
    source_architecture: str
    kv_head_merge: dict | None = dataclasses.field(default=None, hash=False)
    calibration: dict | None = dataclasses.field(default=None, hash=False)
    key_mode: str = "thin"
    latent_groups: int = 1

    @property
    def latent(self) -> bool:
        return self.key_mode == "latent"

    def query_dims(self, layer: int) -> int:
        """Dims per query head that meet the keys: r (thin) or head_dim (latent)."""
        return self.head_dim if self.latent else self.ranks[layer]

    def latent_dims(self, layer: int) -> int:
        """Dims of one latent group of layer l: (num_kv_heads / latent_groups) · r_l."""
        return self.num_kv_heads // self.latent_groups * self.ranks[layer]

    @property
    def uniform_rank(self) -> int | None:
        return self.ranks[0] if len(set(self.ranks)) == 1 else None

    @classmethod
    def build(cls, hf_config: dict, ranks: int | Sequence[int],
              inv_freq: Sequence[Any] | None, *, method: str, source_model: str,
              rotary_attention_scaling: float = 1.0, softmax_scale: float | None = None,
              source_architecture: str | None = None, kv_head_merge: dict | None = None,
              calibration: dict | None = None, key_mode: str = "thin",
              latent_groups: int = 1) -> "FactoredKeysConfig":
        """A new config for a model with `hf_config`'s dimensions (the source's config.json),
        validated exactly like a read one. ranks: one int for every layer, or one per layer;
        inv_freq: per layer a [kv_head][r_l/2] table (nested lists or tensors), None without
        RoPE; softmax_scale defaults to head_dim**-0.5, source_architecture to the config's
        architectures[0]. key_mode="latent": inv_freq per layer is the [kv_head][head_dim/2]
        table of the reconstructed keys."""
        head_dim = model_dims(hf_config)[3]
        block: dict[str, Any] = {
            "format_version": FORMAT_VERSION,
            "key_rank": ranks if isinstance(ranks, int) else list(ranks),
            "head_dim": head_dim,
            "softmax_scale": head_dim ** -0.5 if softmax_scale is None else softmax_scale,
            "rotary_inv_freq": None if inv_freq is None else [
                t.tolist() if isinstance(t, torch.Tensor) else t for t in inv_freq],
            "rotary_attention_scaling": rotary_attention_scaling, "method": method,
            "source_model": source_model,
            "source_architecture": (source_architecture if source_architecture is not None
                                    else (hf_config.get("architectures") or [""])[0]),
            "kv_head_merge": kv_head_merge, "calibration": calibration,
        }
        if key_mode != "thin":
            block.update(key_mode=key_mode, latent_groups=latent_groups)
        return cls.from_hf_config({**hf_config, BLOCK: block})

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "FactoredKeysConfig":
        block = _get(hf_config, BLOCK)
        if block is None:
            raise FactoredCheckpointError(f"config.json has no '{BLOCK}' block")
        if not isinstance(block, dict):
            raise FactoredCheckpointError(f"config.json '{BLOCK}' must be an object")
        for name in REQUIRED_FIELDS:
            if name not in block:
                raise FactoredCheckpointError(f"config.json {BLOCK}.{name} is missing")
        if block["format_version"] != FORMAT_VERSION:
            raise FactoredCheckpointError(
                f"config.json {BLOCK}.format_version is {block['format_version']!r}; "
                f"this FactorKV reads version {FORMAT_VERSION}")
        n_layers, n_heads, n_kv, cfg_head_dim, _ = model_dims(hf_config)
        head_dim = block["head_dim"]
        if not isinstance(head_dim, int) or head_dim != cfg_head_dim:
            raise FactoredCheckpointError(
                f"config.json {BLOCK}.head_dim is {head_dim!r} but the model's head dim is "
                f"{cfg_head_dim}")
        rank = block["key_rank"]
        ranks = [rank] * n_layers if isinstance(rank, int) else rank
        if (not isinstance(ranks, list) or len(ranks) != n_layers
                or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks)):
            raise FactoredCheckpointError(
                f"config.json {BLOCK}.key_rank must be an int or a list of {n_layers} ints")
        for i, r in enumerate(ranks):
            if not 1 <= r <= head_dim:
                raise FactoredCheckpointError(
                    f"config.json {BLOCK}.key_rank[{i}] = {r} is outside 1..head_dim ({head_dim})")
        mode = block.get("key_mode", "thin")
        if mode not in KEY_MODES:
            raise FactoredCheckpointError(
                f"config.json {BLOCK}.key_mode is {mode!r}; expected one of {list(KEY_MODES)}")
        groups = block.get("latent_groups", 1)
        if (not isinstance(groups, int) or isinstance(groups, bool) or groups < 1
                or n_kv % groups):
            raise FactoredCheckpointError(
                f"config.json {BLOCK}.latent_groups is {groups!r}; it must divide the "
                f"{n_kv} KV heads")
        rope_dims = [head_dim] * n_layers if mode == "latent" else ranks
        inv_freq = _parse_inv_freq(block["rotary_inv_freq"], rope_dims, n_kv)
        scale = block.get("softmax_scale", head_dim ** -0.5)
        if not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise FactoredCheckpointError(f"config.json {BLOCK}.softmax_scale must be a positive number")
        att = block.get("rotary_attention_scaling", 1.0)
        if not isinstance(att, (int, float)) or not math.isfinite(att):
            raise FactoredCheckpointError(f"config.json {BLOCK}.rotary_attention_scaling must be a number")
        for name in METADATA_FIELDS:
            if not isinstance(block.get(name), (dict, type(None))):
                raise FactoredCheckpointError(f"config.json {BLOCK}.{name} must be an object")
        return cls(ranks=tuple(ranks), head_dim=head_dim, num_heads=n_heads, num_kv_heads=n_kv,
                   softmax_scale=float(scale), inv_freq=inv_freq,
                   rotary_attention_scaling=float(att), method=str(block["method"]),
                   source_model=str(block["source_model"]),
                   source_architecture=str(block.get("source_architecture", "")),
                   kv_head_merge=copy.deepcopy(block.get("kv_head_merge")),
                   calibration=copy.deepcopy(block.get("calibration")),
                   key_mode=mode, latent_groups=groups)

    def to_block(self) -> dict[str, Any]:
        """The JSON block for config.json (inverse of from_hf_config; a new dict each call)."""
        rank: int | list[int] = self.uniform_rank or list(self.ranks)
        freq = None if self.inv_freq is None else [t.tolist() for t in self.inv_freq]
        block = {
            "format_version": FORMAT_VERSION, "key_rank": rank, "head_dim": self.head_dim,
            "softmax_scale": self.softmax_scale, "rotary_inv_freq": freq,
            "rotary_attention_scaling": self.rotary_attention_scaling, "method": self.method,
            "source_model": self.source_model, "source_architecture": self.source_architecture,
        }
        if self.latent:
            block.update(key_mode=self.key_mode, latent_groups=self.latent_groups)
        for name in METADATA_FIELDS:
            if getattr(self, name) is not None:
                block[name] = copy.deepcopy(getattr(self, name))
        return block


def latent_groups_fit(num_kv_heads: int, latent_groups: int, tp: int) -> bool:
    """Whether TP size tp gives every rank whole KV heads and whole latent groups (every KV
    head of a group reads the group's latent, so a latent must not span ranks)."""
    return num_kv_heads % tp == 0 and (num_kv_heads // tp) % (num_kv_heads // latent_groups) == 0


def _parse_inv_freq(value: Any, ranks: list[int], n_kv: int) -> tuple[torch.Tensor, ...] | None:
    """ranks: the rotated dims per layer (the thin rank, or head_dim for latent keys)."""
    field = f"config.json {BLOCK}.rotary_inv_freq"
    if value is None:
        return None
    if any(r % 2 for r in ranks):
        bad = next(i for i, r in enumerate(ranks) if r % 2)
        raise FactoredCheckpointError(
            f"config.json {BLOCK}.key_rank[{bad}] = {ranks[bad]} is odd, but RoPE needs pairs")
    try:
        t = torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError):
        raise FactoredCheckpointError(f"{field} must be a list of numbers or a [layer][kv_head][r/2] "
                                      "nested list") from None
    if t.dim() == 1:
        if len(set(ranks)) != 1 or t.shape[0] != ranks[0] // 2:
            raise FactoredCheckpointError(
                f"{field} has {t.shape[0]} entries; a flat table needs a uniform key_rank and "
                f"key_rank/2 = {ranks[0] // 2} entries")
        out = tuple(t.unsqueeze(0).expand(n_kv, -1).clone() for _ in ranks)
    else:
        if not isinstance(value, list) or len(value) != len(ranks):
            raise FactoredCheckpointError(f"{field} must have one entry per layer ({len(ranks)})")
        out = []
        for i, (layer, r) in enumerate(zip(value, ranks)):
            lt = torch.tensor(layer, dtype=torch.float64)
            if tuple(lt.shape) != (n_kv, r // 2):
                raise FactoredCheckpointError(
                    f"{field}[{i}] has shape {list(lt.shape)}, expected [{n_kv}, {r // 2}]")
            out.append(lt)
        out = tuple(out)
    for t in out:
        if not torch.isfinite(t).all() or (t < 0).any():
            raise FactoredCheckpointError(f"{field} must hold finite, non-negative frequencies")
    return out


def expected_attention_shapes(hf_config: Any, fk: FactoredKeysConfig) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape for every thin attention projection of the checkpoint."""
    arch = (_get(hf_config, "architectures") or [""])[0]
    _, h, h_kv, d, hidden = model_dims(hf_config)
    shapes: dict[str, tuple[int, ...]] = {}
    for i, r in enumerate(fk.ranks):
        p = f"transformer.h.{i}.attn" if arch == GPT2_ARCH else f"model.layers.{i}.self_attn"
        shapes[f"{p}.q_proj.weight"] = (h * fk.query_dims(i), hidden)
        shapes[f"{p}.k_proj.weight"] = (h_kv * r, hidden)
        if fk.latent:
            shapes[f"{p}.k_up_proj.weight"] = (h_kv * d, fk.latent_dims(i))
        shapes[f"{p}.v_proj.weight"] = (h_kv * d, hidden)
    return shapes


def validate_checkpoint_dir(path: str | Path) -> FactoredKeysConfig | None:
    """Pre-flight check of a model directory; returns None for an ordinary (unfactored) model.

    Reads only config.json and the safetensors headers (no weights), so it is cheap
    enough for the CLI to run before starting vLLM.
    """
    from safetensors import safe_open

    path = Path(path)
    cfg = read_config(path)
    archs = cfg.get("architectures") or []
    if not any(a in FACTORED_ARCHS for a in archs):
        if BLOCK in cfg:
            raise FactoredCheckpointError(
                f"{path}/config.json has a '{BLOCK}' block but architectures={archs}; "
                f"expected one of {list(FACTORED_ARCHS)}")
        return None
    fk = FactoredKeysConfig.from_hf_config(cfg)
    found: dict[str, tuple[int, ...]] = {}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FactoredCheckpointError(f"{path}: no *.safetensors weights")
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():
                    found[name] = tuple(st.get_slice(name).get_shape())
        except Exception as e:  # noqa: BLE001 - any header error means a corrupt file
            raise FactoredCheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    for name, shape in expected_attention_shapes(cfg, fk).items():
        if name not in found:
            raise FactoredCheckpointError(f"{path}: tensor {name} is missing")
        if found[name] != shape:
            raise FactoredCheckpointError(
                f"{path}: tensor {name} has shape {list(found[name])}, expected {list(shape)} "
                f"(from {BLOCK}.key_rank)")
    return fk
