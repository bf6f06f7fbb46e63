"""Single-file and multi-file Wan transformer checkpoints (original Wan, ComfyUI or diffusers layout).

The files are read by `wan_engine.checkpoint_formats` (quantized formats dequantized, each file's
layout detected on its own, names converted by diffusers' `convert_wan_transformer_to_diffusers`); the
architecture comes from an explicit config: the base diffusers folder's (diffusers' own guess from tensor
shapes cannot tell Wan 2.2 from Wan 2.1 apart, and knows no small models), or an original Wan folder's own
config.json. Before any tensor is read, the headers' names and shapes are compared with the model the
config describes, so a checkpoint that belongs to another model fails with a message naming both files
instead of loading half-initialised.

`export_single_file` writes the inverse (diffusers -> original Wan / ComfyUI key names); tests use it
to build single-file checkpoints from the tiny diffusers models.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import torch

from wan_engine.checkpoint_formats import (
    FilePlan,
    checkpoint_report,
    describe_mismatch,
    is_wan_original_folder,
    plan_sources,
    read_state_dict,
    read_wan_config,
    wan_config_to_diffusers,
)
from wan_engine.errors import ModelUnavailableError
from wan_engine.model_checks import PICKLE_SUFFIXES, pickle_refusal

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
    if key == "condition_embedder.image_embedder.pos_embed":
        return "img_emb.emb_pos"  # FLF2V's learnt position embedding (diffusers' conversion script)
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


def _transformer_config(
    plans: list[FilePlan], sources: list[Path], transformer_cls: Any, config_dir: Path, subfolder: str | None
) -> tuple[dict[str, Any], str]:
    """The transformer config (and where it came from): an original Wan folder's own, else the base's."""
    if len(sources) == 1 and is_wan_original_folder(sources[0]):
        shapes = {name: shape for plan in plans for name, shape in plan.shapes.items()}
        config = wan_config_to_diffusers(read_wan_config(sources[0]), shapes)
        return config, f"{sources[0] / 'config.json'} (original Wan config)"
    config = transformer_cls.load_config(config_dir, subfolder=subfolder)
    return config, str(_config_path(config_dir, subfolder) / "config.json")


def _expected_shapes(transformer_cls: Any, config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    from accelerate import init_empty_weights

    with init_empty_weights():
        model = transformer_cls.from_config(config)
    return {name: tuple(p.shape) for name, p in model.state_dict().items()}


def check_against_config(
    path: Path | list[Path],
    transformer_cls: Any,
    config_dir: Path,
    subfolder: str | None,
    modules: tuple[Path, ...] | list[Path] = (),
) -> tuple[list[FilePlan], dict[str, Any]]:
    """Compare the checkpoint's tensor names and shapes with the model the config describes.

    Returns the file plans and the config. Raises `ModelUnavailableError` naming the files and the config
    when they do not belong together.
    """
    sources = [Path(p) for p in (path if isinstance(path, list) else [path])]
    plans = plan_sources(sources, modules)
    config, config_file = _transformer_config(plans, sources, transformer_cls, Path(config_dir), subfolder)
    detail = describe_mismatch(plans, _expected_shapes(transformer_cls, config))
    if detail:
        layouts = "/".join(sorted({p.layout for p in plans}))
        names = " + ".join(str(p) for p in [*sources, *modules])
        raise ModelUnavailableError(
            f"{names} ({layouts} layout) does not match the transformer config {config_file}: {detail}. "
            "Point the preset's model.base at the diffusers model this checkpoint was made from."
        )
    return plans, config


def load_transformer(
    sources: list[Path],
    transformer_cls: Any,
    config_dir: Path,
    subfolder: str | None,
    dtype: torch.dtype,
    modules: tuple[Path, ...] | list[Path] = (),
) -> Any:
    """Load a Wan transformer from checkpoint files (any format of `wan_engine.checkpoint_formats`).

    `sources`: single files or original Wan folders making one whole transformer; `modules`: files adding
    modules to it (Wan2GP VACE module files). The architecture comes from the base's diffusers config
    (`config_dir`/`subfolder`), or from an original Wan folder's own config.json. Quantized weights are
    dequantized to `dtype`; `_keep_in_fp32_modules` stay float32 as `from_pretrained` keeps them.
    The model's `wan_checkpoint` attribute records what was read (see `checkpoint_reports`).
    """
    from accelerate import init_empty_weights

    for source in sources:
        if Path(source).suffix in PICKLE_SUFFIXES:
            raise ModelUnavailableError(pickle_refusal(source))
    plans, config = check_against_config(list(sources), transformer_cls, config_dir, subfolder, modules)
    with init_empty_weights():
        model = transformer_cls.from_config(config)
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])

    def dtype_of(name: str, stored: torch.dtype) -> torch.dtype:
        if not stored.is_floating_point:
            return stored
        return torch.float32 if any(k in name.split(".") for k in keep) else dtype

    state = read_state_dict(plans, dtype_of, dequantized_dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    model = apply_pretrained_dtypes(model, dtype)
    model.wan_checkpoint = checkpoint_report(plans, dtype)
    return model


def load_single_file_transformer(
    path: Path, transformer_cls: Any, config_dir: Path, subfolder: str | None, dtype: torch.dtype
) -> Any:
    """Load a Wan transformer from one safetensors file (or original Wan folder), its architecture from a
    diffusers config folder."""
    return load_transformer([Path(path)], transformer_cls, Path(config_dir), subfolder, dtype)


def load_transformer_with_modules(
    base: Path,
    module_files: list[Path] | tuple[Path, ...],
    transformer_cls: Any,
    config_dir: Path,
    subfolder: str | None,
    dtype: torch.dtype,
) -> Any:
    """A transformer made of a base checkpoint plus module files (Wan2GP `modules`, e.g. VACE).

    `base`: a single file or an original Wan folder holding the whole base transformer (e.g. Wan2GP's
    T2V 14B); `module_files`: files holding only the modules it lacks (`vace_blocks.*`,
    `vace_patch_embedding.*`, original Wan or diffusers names). `config_dir`/`subfolder`: the diffusers
    config of the combined model (a VACE pipeline folder's transformer). A weight found in two files,
    or one the config has no place for, fails naming the files.
    """
    return load_transformer([Path(base)], transformer_cls, Path(config_dir), subfolder, dtype, tuple(module_files))


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
    """`from_pretrained` keyword arguments for the transformers a ModelCheck names as checkpoint files.

    Empty when the preset's sources are diffusers folders and no module files are named. `check.path` is
    the base pipeline folder; its transformer configs describe the architecture. Module files (a
    ModelCheck's optional `modules` / `modules_2`, Wan2GP `modules` such as VACE) are merged onto the
    transformer: onto the single file when there is one, else onto the base folder's own transformer.
    """
    import diffusers

    is_vace = class_name == "WanVACEPipeline"
    transformer_cls = diffusers.WanVACETransformer3DModel if is_vace else diffusers.WanTransformer3DModel
    components: dict[str, Any] = {}
    for attr, file, modules, second in (
        ("transformer", check.single_file, tuple(getattr(check, "modules", ()) or ()), False),
        ("transformer_2", check.single_file_2, tuple(getattr(check, "modules_2", ()) or ()), True),
    ):
        subfolder = expert_config_subfolder(check.path, second)
        if file is None and modules:
            file = Path(check.path) / subfolder  # the base folder's transformer weights (diffusers layout)
        if file is not None:
            components[attr] = load_transformer([Path(file)], transformer_cls, check.path, subfolder, dtype, modules)
    return components


def checkpoint_reports(pipe: Any) -> dict[str, Any] | None:
    """For result_data: per transformer read from checkpoint files, what was read and how (None: folders)."""
    reports = {
        name: getattr(module, "wan_checkpoint", None)
        for name in ("transformer", "transformer_2")
        if (module := getattr(pipe, name, None)) is not None
    }
    reports = {name: report for name, report in reports.items() if report}
    return reports or None
