"""Wan transformer weights as users have them: quantized single files, module files, original Wan folders.

Formats read here (all safetensors; tensor names in original Wan, ComfyUI or diffusers layout):

- plain bf16 / fp16 / fp32 files, and Kijai's unscaled `fp8_e4m3fn` / `fp8_e5m2` files (cast to the
  model dtype);
- Wan2GP's optimum-quanto files (`*_quanto_mbf16_int8`, `*_quanto_bf16_int8`, `*_quanto_mfp16_int8`,
  `..._fp16_int8`): every quantized linear is `<layer>.weight._data` (int8, or float8 for qfloat8) and
  `<layer>.weight._scale` (one scale per output row, in the unquantized dtype), plus the
  `<layer>.input_scale` / `<layer>.output_scale` buffers quanto's QModuleMixin saves; mmgp keeps the
  quantization map in the metadata (`quantization_map_base64`) or beside the file (`<file>_map.json`).
  The weight is `_scale * _data` (quanto's QBytesDequantizer);
- ComfyUI's `*_fp8_scaled` files: `<layer>.weight` in float8 with a float32 `<layer>.scale_weight`
  (per tensor; per row accepted too), an optional `<layer>.scale_input`, and a `scaled_fp8` marker
  tensor. The weight is `weight * scale_weight` (comfy/ops.py, scaled_fp8_ops);
- ComfyUI's per-layer quantized files (`<layer>.weight_scale` + `<layer>.comfy_quant`) in float8.

Quantized weights are dequantized once at load, each straight into the dtype the model keeps it in, so
the resident model is an ordinary bf16 (or float32) transformer: LoRAs, fp8 (`WAN_FP8`), offload and the
pinned cache work on it unchanged. What was read is recorded (`checkpoint_report`) for result_data.

Several files may make one transformer: the shards of the original Wan repository's folder
(`config.json` in Wan's own format + `diffusion_pytorch_model-0000N-of-0000M.safetensors` + index), or a
base T2V transformer plus Wan2GP VACE module files (`vace_blocks.*`, `vace_patch_embedding.*` only).
Each file's layout is detected on its own and renamed to diffusers names through diffusers' converter.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wan_engine.errors import ModelUnavailableError
from wan_engine.model_checks import (
    PICKLE_SUFFIXES,
    FolderReport,
    SafetensorsError,
    SafetensorsHeader,
    _check_json,
    _check_shard_index,
    pickle_refusal,
    read_safetensors_header,
)

COMFYUI_PREFIX = "model.diffusion_model."
WAN_CONFIG = "config.json"
WAN_INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Keys of the original Wan (WanModel) config.json; any two of these, and no diffusers keys, mark one.
_WAN_CONFIG_KEYS = {"dim", "num_heads", "num_layers", "in_dim", "out_dim", "ffn_dim", "model_type"}
_FP8_DTYPES = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
_PLAIN_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32"}
_STORED_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# diffusers' converter leaves FLF2V's learnt image position embedding unnamed; its conversion script maps it so.
_ORIGINAL_RENAMES = {"img_emb.emb_pos": "condition_embedder.image_embedder.pos_embed"}


@dataclass(frozen=True)
class Quantized:
    """One dequantized weight: `scale * data` (scale broadcast per tensor or per output row)."""

    data: str
    scale: str


@dataclass
class FilePlan:
    """What one checkpoint file contributes: diffusers name -> file key (plain) or `Quantized` keys."""

    path: Path
    layout: str  # "wan", "comfyui", "diffusers"
    format: str  # "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2", "quanto_int8", "quanto_fp8", "fp8_scaled", ...
    tensors: dict[str, str | Quantized] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def quantized(self) -> int:
        """Number of weights that are dequantized at load."""
        return sum(isinstance(v, Quantized) for v in self.tensors.values())


def gguf_refusal(path: Path | str) -> str:
    """The sentence that refuses a GGUF checkpoint, naming the file and what to use."""
    return (
        f"{path} is a GGUF checkpoint: not supported. Use the bf16, fp16, fp8_e4m3fn, fp8_scaled or Wan2GP quanto "
        "int8 .safetensors file of the same model."
    )


class UnsupportedCheckpointError(ModelUnavailableError):
    """A checkpoint in a format this worker does not read; the message names it and what to use instead."""


# ---- format and layout of one file (header only) ---------------------------------------------------------


def _quanto_map(header: SafetensorsHeader) -> dict[str, Any] | None:
    """mmgp's quantization map: in the metadata (base64 JSON) or in `<file>_map.json` next to the file."""
    raw = header.metadata.get("quantization_map_base64")
    if raw:
        try:
            return json.loads(base64.b64decode(raw))
        except ValueError:
            return None
    side = header.path.with_name(header.path.stem + "_map.json")
    if side.is_file():
        try:
            data = json.loads(side.read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None
    return None


def _refuse_unsupported(header: SafetensorsHeader, names: set[str]) -> None:
    path = header.path
    if any(n.endswith("._shift") for n in names) or any(
        n.endswith(".weight._data") and header.tensors[n].dtype == "U8" for n in names
    ):
        raise UnsupportedCheckpointError(
            f"{path} is an optimum-quanto 4-bit/2-bit checkpoint (packed `_data` with `_scale`/`_shift`): only "
            "quanto int8 and float8 files are dequantized. Use Wan2GP's `*_quanto_*_int8.safetensors` or the "
            "bf16/fp16 file of the same model."
        )
    if any(n.endswith(".weight_scale_2") for n in names) or any(
        n.endswith(".weight") and header.tensors[n].dtype in ("U8", "I8") for n in names
    ):
        raise UnsupportedCheckpointError(
            f"{path} holds 4-bit / integer packed weights (NVFP4, MXFP4 or int8 `.weight` tensors): not supported. "
            "Use the bf16, fp16, fp8_e4m3fn, fp8_scaled or Wan2GP quanto int8 file of the same model."
        )
    if any(n.endswith((".qweight", ".qzeros", ".g_idx")) for n in names):
        raise UnsupportedCheckpointError(
            f"{path} is a GPTQ/AWQ checkpoint (`.qweight`/`.qzeros`): not supported. Use the bf16, fp16, fp8 or "
            "Wan2GP quanto int8 file of the same model."
        )


def _comfy_quant_format(path: Path, key: str) -> str:
    """The `format` of a ComfyUI per-layer `comfy_quant` tensor (UTF-8 JSON bytes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        raw = handle.get_tensor(key)
    try:
        return str(json.loads(bytes(raw.to(torch.uint8).tolist()).decode("utf-8")).get("format", ""))
    except (ValueError, AttributeError):
        return ""


def plan_file(path: Path, *, partial: bool = False) -> FilePlan:
    """Read one file's header: its format, layout, and the diffusers name of each weight it holds.

    `partial`: the file may hold only some modules (a VACE module file); otherwise it must be a whole
    Wan transformer. Raises `UnsupportedCheckpointError` / `ModelUnavailableError` naming the file.
    """
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelUnavailableError(pickle_refusal(path))
    if path.suffix == ".gguf":
        raise UnsupportedCheckpointError(gguf_refusal(path))
    try:
        header = read_safetensors_header(path)
    except SafetensorsError as exc:
        raise ModelUnavailableError(f"corrupted checkpoint: {exc}") from None
    raw_names = set(header.tensors)
    comfy = any(n.startswith(COMFYUI_PREFIX) for n in raw_names)
    strip = (lambda n: n[len(COMFYUI_PREFIX) :] if n.startswith(COMFYUI_PREFIX) else n) if comfy else (lambda n: n)
    by_name = {strip(n): n for n in raw_names}
    names = set(by_name)
    entries = {n: header.tensors[by_name[n]] for n in names}

    quanto = any(n.endswith(".weight._data") for n in names)
    scaled = "scaled_fp8" in names or any(n.endswith(".scale_weight") for n in names)
    per_layer = any(n.endswith(".comfy_quant") for n in names)
    _refuse_unsupported(SafetensorsHeader(path, 0, 0, entries, header.metadata), names)

    logical: dict[str, str | Quantized] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    skip_suffixes: tuple[str, ...] = ()
    if quanto:
        skip_suffixes += (".weight._scale", ".input_scale", ".output_scale")
    if scaled:
        skip_suffixes += (".scale_weight", ".scale_input")
    if per_layer:
        skip_suffixes += (".weight_scale", ".comfy_quant", ".input_scale")
    for name in sorted(names):
        if name == "scaled_fp8" or name.endswith(skip_suffixes):
            continue
        if name.endswith(".weight._data"):
            weight = name[: -len("._data")]
            scale = weight + "._scale"
            if scale not in names:
                raise ModelUnavailableError(f"{path}: quanto weight {name!r} has no {scale!r}; the file is incomplete")
            logical[weight] = Quantized(by_name[name], by_name[scale])
            shapes[weight] = entries[name].shape
            continue
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base is not None and scaled and base + ".scale_weight" in names:
            logical[name] = Quantized(by_name[name], by_name[base + ".scale_weight"])
        elif base is not None and per_layer and base + ".weight_scale" in names:
            fmt = _comfy_quant_format(path, by_name[base + ".comfy_quant"]) if base + ".comfy_quant" in names else ""
            if fmt and not fmt.startswith("float8"):
                raise UnsupportedCheckpointError(
                    f"{path}: layer {base!r} is quantized as {fmt!r} (ComfyUI comfy_quant); only float8 layers "
                    "are dequantized. Use the bf16, fp16 or fp8_scaled file of the same model."
                )
            logical[name] = Quantized(by_name[name], by_name[base + ".weight_scale"])
        else:
            logical[name] = by_name[name]
        shapes[name] = entries[name].shape

    fmt = _format_name(entries, quanto=quanto, scaled=scaled, per_layer=per_layer, path=path, header=header)
    layout = _layout(set(logical), partial=partial)
    if layout is None:
        raise ModelUnavailableError(
            f"{path} is not a Wan transformer checkpoint (no 'head.modulation' / 'patch_embedding.weight' in "
            "original Wan, ComfyUI or diffusers layout"
            + (", and no 'vace_blocks.*' module weights)" if partial else ")")
        )
    tensors, diff_shapes = _rename(logical, shapes, layout)
    return FilePlan(path, "comfyui" if comfy else layout, fmt, tensors, diff_shapes)


def _format_name(
    entries: dict[str, Any], *, quanto: bool, scaled: bool, per_layer: bool, path: Path, header: SafetensorsHeader
) -> str:
    if quanto:
        data = {e.dtype for n, e in entries.items() if n.endswith(".weight._data")}
        qmap = _quanto_map(header) or {}
        weights = {str(v.get("weights", "")) for v in qmap.values() if isinstance(v, dict)}
        if weights - {"qint8", "qfloat8", "qfloat8_e4m3fn", "qfloat8_e5m2", "none", ""}:
            raise UnsupportedCheckpointError(
                f"{path}: optimum-quanto weights {sorted(weights)}: only qint8 and qfloat8 are dequantized. Use "
                "the `*_quanto_*_int8` or bf16 file of the same model."
            )
        return "quanto_int8" if data <= {"I8"} else "quanto_fp8"
    if scaled:
        return "fp8_scaled"
    if per_layer:
        return "comfy_quant_fp8"
    counts: dict[str, int] = {}
    for entry in entries.values():
        counts[entry.dtype] = counts.get(entry.dtype, 0) + entry.numel
    fp8 = [d for d in counts if d in _FP8_DTYPES]
    if fp8:
        return _FP8_DTYPES[max(fp8, key=lambda d: counts[d])]
    dominant = max(counts, key=lambda d: counts[d]) if counts else "F32"
    return _PLAIN_DTYPES.get(dominant, dominant.lower())


_ORIGINAL_MARKERS = (".self_attn.", ".cross_attn.", ".before_proj.", ".after_proj.", ".ffn.0.", ".modulation")
_DIFFUSERS_MARKERS = (".attn1.", ".attn2.", ".proj_in.", ".proj_out.", ".ffn.net.", ".scale_shift_table")


def _layout(names: set[str], *, partial: bool) -> str | None:
    if "head.modulation" in names and "patch_embedding.weight" in names:
        return "wan"
    if "scale_shift_table" in names and "condition_embedder.time_proj.weight" in names:
        return "diffusers"
    if partial and names:
        if any(m in n for n in names for m in _ORIGINAL_MARKERS):
            return "wan"
        if any(m in n for n in names for m in _DIFFUSERS_MARKERS):
            return "diffusers"
    return None


def _rename(
    logical: dict[str, str | Quantized], shapes: dict[str, tuple[int, ...]], layout: str
) -> tuple[dict[str, str | Quantized], dict[str, tuple[int, ...]]]:
    if layout == "diffusers":
        return dict(logical), dict(shapes)
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    pre = {_ORIGINAL_RENAMES.get(k, k): k for k in logical}
    converted = convert_wan_transformer_to_diffusers({k: k for k in pre})  # renames keys only
    mapping = {new: pre[str(old)] for new, old in converted.items()}
    return {new: logical[old] for new, old in mapping.items()}, {new: shapes[old] for new, old in mapping.items()}


def format_refusal(path: Path) -> str | None:
    """The sentence refusing a file in an unsupported quantized format (headers only), else None.

    For the cheap start-up check; anything else wrong with the file is reported when it is loaded.
    """
    path = Path(path)
    if path.suffix == ".gguf":
        return gguf_refusal(path)
    try:
        header = read_safetensors_header(path)
        names = {n.removeprefix(COMFYUI_PREFIX): n for n in header.tensors}
        entries = {n: header.tensors[raw] for n, raw in names.items()}
        _refuse_unsupported(SafetensorsHeader(path, 0, 0, entries, header.metadata), set(entries))
    except UnsupportedCheckpointError as exc:
        return str(exc)
    except (SafetensorsError, ModelUnavailableError):
        return None
    return None


# ---- original Wan folders ---------------------------------------------------------------------------------


def is_wan_original_folder(folder: Path) -> bool:
    """True for a folder in the original Wan repository layout: Wan's own config.json + safetensors weights."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / "model_index.json").is_file():
        return False
    try:
        config = json.loads((folder / WAN_CONFIG).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(config, dict) or "num_attention_heads" in config or "attention_head_dim" in config:
        return False
    return len(_WAN_CONFIG_KEYS & set(config)) >= 2 and any(folder.glob("*.safetensors"))


def wan_expert_folders_hint(folder: Path) -> str | None:
    """For the root of an original Wan 2.2 A14B repository (`high_noise_model/`, `low_noise_model/`): how to
    name its two experts; None for any other folder."""
    folder = Path(folder)
    high, low = folder / "high_noise_model", folder / "low_noise_model"
    if is_wan_original_folder(high) and is_wan_original_folder(low):
        return (
            f"{folder} is an original Wan 2.2 repository folder with two experts: set URLs to {high} and "
            f"URLs2 to {low} (and model.base to the diffusers model for the VAE and text encoder)"
        )
    return None


def wan_folder_files(folder: Path) -> list[Path]:
    """The weight files of an original Wan folder: the shards its index names, else every safetensors file."""
    folder = Path(folder)
    index = folder / WAN_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (OSError, ValueError, AttributeError):
            weight_map = {}
        if isinstance(weight_map, dict) and weight_map:
            return [folder / name for name in sorted(set(weight_map.values()))]
    return sorted(folder.glob("*.safetensors"))


def transformer_files(source: Path) -> list[Path]:
    """The weight files a transformer source reads: the file itself, or an original Wan folder's shards."""
    source = Path(source)
    return wan_folder_files(source) if source.is_dir() else [source]


def inspect_wan_folder(folder: Path) -> FolderReport:
    """Cheap check of an original Wan folder: readable config.json, complete shards and index."""
    report = FolderReport()
    _check_json(folder / WAN_CONFIG, WAN_CONFIG, report)
    index = folder / WAN_INDEX
    if index.is_file():
        _check_shard_index(index, folder.name, report)
        # Missing shards relative to the folder itself (the caller prefixes the folder).
        report.missing = [m.removeprefix(f"{folder.name}/") for m in report.missing]
        return report
    for path in sorted(folder.glob("*.safetensors")):
        try:
            read_safetensors_header(path)
        except SafetensorsError as exc:
            report.corrupted.append(str(exc))
    return report


def wan_config_to_diffusers(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> dict[str, Any]:
    """The diffusers transformer config of an original Wan config.json (WanModel's arguments).

    `shapes` (diffusers names -> shapes of the checkpoint) decides what the config leaves implicit: the
    text width, the patch size, the CLIP image projection (Wan 2.1 I2V/FLF2V have one, Wan 2.2 I2V not),
    the FLF2V position embedding and the VACE input width.
    """

    def need(key: str) -> Any:
        if key not in config:
            raise ModelUnavailableError(f"original Wan config.json has no {key!r} (keys: {sorted(config)})")
        return config[key]

    dim, heads = int(need("dim")), int(need("num_heads"))
    if dim % heads:
        raise ModelUnavailableError(f"original Wan config.json: dim {dim} is not a multiple of num_heads {heads}")
    patch = shapes.get("patch_embedding.weight")
    text = shapes.get("condition_embedder.text_embedder.linear_1.weight")
    out: dict[str, Any] = {
        "patch_size": list(patch[2:]) if patch else list(config.get("patch_size", (1, 2, 2))),
        "num_attention_heads": heads,
        "attention_head_dim": dim // heads,
        "in_channels": int(config.get("in_dim", patch[1] if patch else 16)),
        "out_channels": int(config.get("out_dim", 16)),
        "text_dim": int(text[1]) if text else int(config.get("text_dim", 4096)),
        "freq_dim": int(config.get("freq_dim", 256)),
        "ffn_dim": int(need("ffn_dim")),
        "num_layers": int(need("num_layers")),
        "cross_attn_norm": bool(config.get("cross_attn_norm", True)),
        "qk_norm": "rms_norm_across_heads" if config.get("qk_norm", True) else None,
        "eps": float(config.get("eps", 1e-6)),
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }
    image = shapes.get("condition_embedder.image_embedder.norm1.weight")
    if image is not None:
        out["image_dim"] = int(image[0])
        out["added_kv_proj_dim"] = dim
    pos = shapes.get("condition_embedder.image_embedder.pos_embed")
    if pos is not None:
        out["pos_embed_seq_len"] = int(pos[1])
    vace = shapes.get("vace_patch_embedding.weight")
    if vace is not None or "vace_layers" in config:
        out["vace_layers"] = [int(x) for x in config.get("vace_layers", [])]
        out["vace_in_channels"] = int(config.get("vace_in_dim", vace[1] if vace else 96))
    return out


def read_wan_config(folder: Path) -> dict[str, Any]:
    """An original Wan folder's config.json (a JSON object)."""
    try:
        config = json.loads((Path(folder) / WAN_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise ModelUnavailableError(f"{folder}/{WAN_CONFIG}: unreadable ({exc})") from None
    if not isinstance(config, dict):
        raise ModelUnavailableError(f"{folder}/{WAN_CONFIG}: not a JSON object")
    return config


# ---- planning and loading several files ------------------------------------------------------------------


def plan_sources(sources: Sequence[Path], modules: Sequence[Path] = ()) -> list[FilePlan]:
    """Plans for a transformer's weight files: whole sources (files or original Wan folders) plus module files.

    Shards of one folder are each partial; together (and with the module files) they must make one
    whole transformer, which `expected_mismatch` then checks against the config.
    """
    plans: list[FilePlan] = []
    for source in sources:
        files = transformer_files(Path(source))
        plans += [plan_file(f, partial=len(files) > 1) for f in files]
    plans += [plan_file(Path(m), partial=True) for m in modules]
    seen: dict[str, Path] = {}
    for plan in plans:
        for name in plan.tensors:
            if name in seen:
                raise ModelUnavailableError(
                    f"weight {name!r} is in both {seen[name]} and {plan.path}: a module file must hold only the "
                    "modules the base transformer lacks (Wan2GP VACE modules: vace_blocks.*, vace_patch_embedding.*)"
                )
            seen[name] = plan.path
    return plans


def describe_mismatch(plans: Sequence[FilePlan], expected: dict[str, tuple[int, ...]]) -> str | None:
    """None when the files hold exactly the weights `expected` describes; else what differs."""
    got = {name: shape for plan in plans for name, shape in plan.shapes.items()}
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    wrong = [
        f"{name} {list(got[name])} vs {list(shape)}"
        for name, shape in expected.items()
        if name in got and tuple(got[name]) != tuple(shape)
    ]
    details = [f"{len(missing)} weights missing (first: {missing[0]})"] if missing else []
    details += [f"{len(extra)} weights the config has no place for (first: {extra[0]})"] if extra else []
    details += [f"{len(wrong)} shapes differ (first: {wrong[0]}, file vs config)"] if wrong else []
    return "; ".join(details) or None


def _dequantize(data: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`scale * data` in float32 (exact for int8/fp8 times a bf16/fp16/fp32 scale), then cast once."""
    scale = scale.float()
    if scale.numel() > 1 and scale.dim() == 1 and data.dim() >= 2 and scale.shape[0] == data.shape[0]:
        scale = scale.reshape(-1, *([1] * (data.dim() - 1)))  # one scale per output row
    return (data.float() * scale).to(dtype)


def read_state_dict(
    plans: Sequence[FilePlan], dtype_of: Any, *, dequantized_dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The diffusers-named tensors of `plans`; `dtype_of(name, stored_dtype)` gives each weight's final dtype."""
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    for plan in plans:
        with safe_open(str(plan.path), framework="pt") as handle:
            for name, source in plan.tensors.items():
                if isinstance(source, Quantized):
                    target = dtype_of(name, dequantized_dtype)
                    state[name] = _dequantize(handle.get_tensor(source.data), handle.get_tensor(source.scale), target)
                else:
                    tensor = handle.get_tensor(source)
                    target = dtype_of(name, tensor.dtype)
                    state[name] = tensor.to(target) if tensor.is_floating_point() else tensor
    return state


def checkpoint_report(plans: Sequence[FilePlan], dtype: torch.dtype) -> dict[str, Any]:
    """What result_data records about a transformer read from files: format(s), layout, how it was loaded."""
    formats = sorted({p.format for p in plans})
    quantized = sum(p.quantized for p in plans)
    report: dict[str, Any] = {
        "checkpoint_format": formats[0] if len(formats) == 1 else formats,
        "layout": sorted({p.layout for p in plans})[0] if len({p.layout for p in plans}) == 1 else None,
        "files": [str(p.path) for p in plans],
    }
    if report["layout"] is None:
        report["layout"] = sorted({p.layout for p in plans})
    resident = str(dtype).removeprefix("torch.")
    report["resident_dtype"] = resident
    if quantized:
        report["dequantized_to"] = resident
        report["dequantized_weights"] = quantized
    # One readable sentence of how the weights were loaded. Quantized files are dequantized once, not kept
    # quantized: on an H200 the kept int8/fp8 kernels were no faster than bf16 (docs/BENCHMARKS.md, issue 14).
    same = all(_STORED_DTYPES.get(p.format) == dtype for p in plans)
    if quantized:
        report["loaded_as"] = f"dequantized to {resident} at load ({quantized} quantized weights; not kept quantized)"
    elif same:
        report["loaded_as"] = f"as stored ({resident})"
    else:
        report["loaded_as"] = f"cast to {resident} at load"
    return report
