"""Single-file Wan transformer checkpoints (original Wan or ComfyUI layout), in safetensors only.

Loading goes through diffusers' `from_single_file(path, config=<diffusers folder>, subfolder=...)`:
the key names are converted by diffusers' `convert_wan_transformer_to_diffusers`, and the
architecture comes from the explicit config (diffusers' own guess from tensor shapes cannot tell
Wan 2.2 from Wan 2.1 apart, and knows no small models). Before that, the header's tensor names and
shapes are compared with the model the config describes, so a checkpoint that belongs to another
model fails with a message naming both files instead of loading half-initialised.

`export_single_file` writes the inverse (diffusers -> original Wan / ComfyUI key names); tests use it
to build single-file checkpoints from the tiny diffusers models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch

from wan_engine.errors import ModelUnavailableError
from wan_engine.model_checks import PICKLE_SUFFIXES, SafetensorsError, pickle_refusal, read_safetensors_header

Layout = Literal["wan", "comfyui", "diffusers"]
COMFYUI_PREFIX = "model.diffusion_model."

# diffusers prefix -> original Wan prefix, for the non-block modules.
_TOP_LEVEL = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("condition_embedder.image_embedder.norm1.", "img_emb.proj.0."),
    ("condition_embedder.image_embedder.ff.net.0.proj.", "img_emb.proj.1."),
    ("condition_embedder.image_embedder.ff.net.2.", "img_emb.proj.3."),
    ("condition_embedder.image_embedder.norm2.", "img_emb.proj.4."),
    ("proj_out.", "head.head."),
)
# diffusers -> original Wan, inside `blocks.N.` / `vace_blocks.N.`.
_IN_BLOCK = (
    ("attn1.", "self_attn."),
    ("attn2.", "cross_attn."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
    ("norm2.", "norm3."),  # diffusers' norm2 is the cross-attention norm, Wan's norm3 (and vice versa)
    ("norm3.", "norm2."),
)
_IN_ATTENTION = (
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    (".add_k_proj.", ".k_img."),
    (".add_v_proj.", ".v_img."),
    (".norm_added_k.", ".norm_k_img."),
)
_IN_VACE_BLOCK = (("proj_in.", "before_proj."), ("proj_out.", "after_proj."))
_BLOCK = re.compile(r"^((?:vace_)?blocks\.\d+\.)(.*)$")


def diffusers_key_to_wan(key: str) -> str:
    """The original Wan name of a diffusers Wan transformer parameter (inverse of diffusers' converter)."""
    if key == "scale_shift_table":
        return "head.modulation"
    for ours, theirs in _TOP_LEVEL:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    match = _BLOCK.match(key)
    if not match:
        return key  # patch_embedding, vace_patch_embedding: same name in both layouts
    prefix, rest = match.groups()
    if rest == "scale_shift_table":
        return prefix + "modulation"
    renames = _IN_BLOCK + (_IN_VACE_BLOCK if prefix.startswith("vace_") else ())
    for ours, theirs in renames:
        if rest.startswith(ours):
            rest = theirs + rest[len(ours) :]
            break
    for ours, theirs in _IN_ATTENTION:
        rest = rest.replace(ours, theirs)
    return prefix + rest


def export_single_file(transformer: torch.nn.Module, path: Path, layout: Layout = "wan") -> Path:
    """Write a diffusers Wan transformer as one safetensors file in the original Wan or ComfyUI layout."""
    from safetensors.torch import save_file

    prefix = COMFYUI_PREFIX if layout == "comfyui" else ""
    state = {}
    for key, tensor in transformer.state_dict().items():
        name = key if layout == "diffusers" else prefix + diffusers_key_to_wan(key)
        state[name] = tensor.detach().contiguous().cpu()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def detect_layout(keys: list[str] | set[str]) -> Layout | None:
    """Which layout a checkpoint's tensor names follow; None when it is not a Wan transformer."""
    keys = set(keys)
    if any(k.startswith(COMFYUI_PREFIX) for k in keys):
        keys = {k[len(COMFYUI_PREFIX) :] for k in keys if k.startswith(COMFYUI_PREFIX)}
        return "comfyui" if "head.modulation" in keys and "patch_embedding.weight" in keys else None
    if "head.modulation" in keys and "patch_embedding.weight" in keys:
        return "wan"  # the key diffusers' infer_diffusers_model_type looks for
    if "scale_shift_table" in keys and "condition_embedder.time_proj.weight" in keys:
        return "diffusers"
    return None


def _to_diffusers_names(keys: list[str]) -> dict[str, str]:
    """diffusers name -> checkpoint name, through diffusers' own converter (it only renames keys)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({k: k for k in keys})
    return {new: str(old) for new, old in converted.items()}


def _config_path(config_dir: Path, subfolder: str | None) -> Path:
    return config_dir / subfolder if subfolder else config_dir


def check_against_config(path: Path, transformer_cls: Any, config_dir: Path, subfolder: str | None) -> None:
    """Compare the checkpoint's tensor names and shapes with the model the config describes.

    Raises `ModelUnavailableError` naming both files when they do not belong together.
    """
    from accelerate import init_empty_weights

    header = read_safetensors_header(path)
    layout = detect_layout(list(header.tensors))
    if layout is None:
        raise ModelUnavailableError(
            f"{path} is not a Wan transformer checkpoint (no 'head.modulation' / 'patch_embedding.weight' "
            "in original Wan, ComfyUI or diffusers layout)"
        )
    names = list(header.tensors)
    mapping = {n: n for n in names} if layout == "diffusers" else _to_diffusers_names(names)
    with init_empty_weights():
        model = transformer_cls.from_config(transformer_cls.load_config(config_dir, subfolder=subfolder))
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    config_file = _config_path(config_dir, subfolder) / "config.json"
    missing = sorted(set(expected) - set(mapping))
    extra = sorted(mapping[n] for n in set(mapping) - set(expected))
    wrong = [
        f"{name} {list(header.tensors[mapping[name]].shape)} vs {list(shape)}"
        for name, shape in expected.items()
        if name in mapping and tuple(header.tensors[mapping[name]].shape) != shape
    ]
    if missing or extra or wrong:
        details = [f"{len(missing)} weights missing (first: {missing[0]})"] if missing else []
        details += [f"{len(extra)} weights the config has no place for (first: {extra[0]})"] if extra else []
        details += [f"{len(wrong)} shapes differ (first: {wrong[0]}, file vs config)"] if wrong else []
        detail = "; ".join(details)
        raise ModelUnavailableError(
            f"{path} ({layout} layout) does not match the transformer config {config_file}: {detail}. "
            "Point the preset's model.base at the diffusers model this checkpoint was made from."
        )


def load_single_file_transformer(
    path: Path, transformer_cls: Any, config_dir: Path, subfolder: str | None, dtype: torch.dtype
) -> Any:
    """Load a Wan transformer from one safetensors file, its architecture from a diffusers config folder."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelUnavailableError(pickle_refusal(path))
    try:
        check_against_config(path, transformer_cls, config_dir, subfolder)
    except SafetensorsError as exc:
        raise ModelUnavailableError(f"corrupted checkpoint: {exc}") from None
    # local_files_only: config_dir is a local folder; nothing may be fetched from the Hub here.
    model = transformer_cls.from_single_file(
        str(path), config=str(config_dir), subfolder=subfolder, local_files_only=True
    )
    return apply_pretrained_dtypes(model, dtype)


def apply_pretrained_dtypes(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast weights to `dtype` as `from_pretrained(dtype=...)` does: `_keep_in_fp32_modules` stay float32.

    (`from_single_file(torch_dtype=...)` casts everything, the Wan norms, modulation tables and
    rotary buffers included; the same checkpoint would then compute differently from its folder.)
    """
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, tensor in model.state_dict(keep_vars=True).items():
        if torch.is_floating_point(tensor):
            target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            tensor.data = tensor.data.to(target)
    return model


def expert_config_subfolder(base: Path, second: bool) -> str:
    """The base folder's config for an expert: `transformer_2` for the low-noise one when it has one."""
    if second and (base / "transformer_2" / "config.json").is_file():
        return "transformer_2"
    return "transformer"


def load_single_file_transformers(check: Any, class_name: str, dtype: torch.dtype) -> dict[str, Any]:
    """`from_pretrained` keyword arguments for the transformers a ModelCheck names as single files.

    Empty when the preset's sources are diffusers folders. `check.path` is the base pipeline folder;
    its transformer configs describe the architecture.
    """
    import diffusers

    is_vace = class_name == "WanVACEPipeline"
    transformer_cls = diffusers.WanVACETransformer3DModel if is_vace else diffusers.WanTransformer3DModel
    components: dict[str, Any] = {}
    for attr, file, second in (
        ("transformer", check.single_file, False),
        ("transformer_2", check.single_file_2, True),
    ):
        if file is not None:
            subfolder = expert_config_subfolder(check.path, second)
            components[attr] = load_single_file_transformer(file, transformer_cls, check.path, subfolder, dtype)
    return components
