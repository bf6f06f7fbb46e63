"""Wan2GP model definitions (`defaults/*.json`, `finetunes/*.json`) read as they are.

A Wan2GP definition is a preset file with Wan2GP's names: its `architecture` says which model
(`t2v_1.3B`, `t2v_2_2`, `vace_14B_2_2`, ...), `URLs` / `URLs2` may name another definition instead of
files (`"URLs": "t2v_2_2"`: that definition's files), `modules` lists module files merged onto the
base transformer (VACE), and many keys drive Wan2GP's UI only. This module owns that translation:

- `normalize`: one file's dict in Wan2GP's terms -> one in this worker's (architecture, group, the
  Wan2GP architecture kept for base and LoRA folders), with the keys that change nothing here taken
  out and returned (recorded on the preset as ignored);
- `skip_reason`: definitions of families this worker does not serve (LTX, Hunyuan, Flux, Qwen, other
  Wan variants such as MultiTalk) are skipped, with the reason for one warning line;
- `resolve_references`: `URLs`, `URLs2` and `modules` naming other definitions, once every file is read;
- `default_base`: the diffusers folder a single-file checkpoint takes its config and other
  components from when the definition has no `model.base`;
- `lora_subdirs`: the LoRA subfolders (this worker's group folders, then Wan2GP's) a model looks in.

The facts (architecture names, folder names, the reference rules) are Wan2GP's (wgp.py,
models/wan/wan_handler.py); nothing here imports it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from wan_engine.errors import PresetError


@dataclass(frozen=True)
class WanArchitecture:
    """What one Wan2GP architecture name means here."""

    architecture: str  # this worker's architecture (presets.Architecture)
    group: str  # "wan" (Wan 2.1) or "wan2_2"
    base: str  # the diffusers repo id a single-file checkpoint of it is completed with
    lora_dir: str  # Wan2GP's LoRA subfolder for it (wan_handler.get_lora_dir)


# Every Wan2GP architecture of the Wan families this worker serves. `base` is looked up under
# --models-dir as <models_dir>/<owner>/<name>, <models_dir>/<name> and in the HF cache (model_sources).
WAN2GP_ARCHITECTURES: Mapping[str, WanArchitecture] = {
    "t2v": WanArchitecture("t2v", "wan", "Wan-AI/Wan2.1-T2V-14B-Diffusers", "wan"),
    "t2v_1.3B": WanArchitecture("t2v", "wan", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "wan_1.3B"),
    "t2v_2_2": WanArchitecture("t2v", "wan2_2", "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "wan"),
    "i2v": WanArchitecture("i2v", "wan", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "wan_i2v"),
    "i2v_2_2": WanArchitecture("i2v", "wan2_2", "Wan-AI/Wan2.2-I2V-A14B-Diffusers", "wan"),
    "ti2v_2_2": WanArchitecture("ti2v", "wan2_2", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "wan_5B"),
    "flf2v_720p": WanArchitecture("flf2v", "wan", "Wan-AI/Wan2.1-FLF2V-14B-720P-diffusers", "wan_i2v"),
    "vace_1.3B": WanArchitecture("vace", "wan", "Wan-AI/Wan2.1-VACE-1.3B-diffusers", "wan_1.3B"),
    "vace_14B": WanArchitecture("vace", "wan", "Wan-AI/Wan2.1-VACE-14B-diffusers", "wan"),
    # No official Wan 2.2 VACE exists in diffusers' layout: the VACE-Fun A14B conversion gives both
    # experts' VACE transformer configs.
    "vace_14B_2_2": WanArchitecture("vace", "wan2_2", "linoyts/Wan2.2-VACE-Fun-14B-diffusers", "wan"),
}
# This worker's own architecture names (presets.Architecture), accepted as they are.
NATIVE_ARCHITECTURES = frozenset({"t2v", "vace", "i2v", "flf2v", "ti2v"})
# Our names + group -> the Wan2GP name whose base completes a single file (1.3B needs the Wan2GP name).
_NATIVE_TO_WAN2GP = {
    ("t2v", "wan"): "t2v",
    ("t2v", "wan2_2"): "t2v_2_2",
    ("i2v", "wan"): "i2v",
    ("i2v", "wan2_2"): "i2v_2_2",
    ("ti2v", "wan2_2"): "ti2v_2_2",
    ("ti2v", "wan"): "ti2v_2_2",
    ("flf2v", "wan"): "flf2v_720p",
    ("vace", "wan"): "vace_14B",
    ("vace", "wan2_2"): "vace_14B_2_2",
}
_LORA_DIRS_BY_ARCHITECTURE = {"t2v": "wan", "vace": "wan", "i2v": "wan_i2v", "flf2v": "wan_i2v", "ti2v": "wan_5B"}

# Wan2GP's other Wan models (wan_handler / df_handler / ovi_handler types): other transformers
# (audio, pose, camera, diffusion forcing, ...) that diffusers' Wan pipelines do not run.
WAN_FAMILY_NOT_SERVED = frozenset(
    {
        "multitalk", "infinitetalk", "fantasy", "vace_multitalk_14B", "vace_standin_14B", "vace_lynx_14B",
        "vace_lynx_lite_14B", "vace_ditto_14B", "standin", "lynx_lite", "lynx", "phantom_1.3B", "phantom_14B",
        "recam_1.3B", "animate", "animate2", "alpha", "alpha2", "alpha_lynx", "chrono_edit", "shotplan_t2v",
        "shotplan_t2v_2_2", "i2v_2_2_multitalk", "lucy_edit", "kiwi_edit", "fun_inp_1.3B", "fun_inp", "mocha",
        "steadydancer", "wanmove", "scail", "scail2_14B", "scail2_1.3B", "vista4d", "i2v_2_2_svi2pro", "bernini",
        "bernini_1.3B", "sky_df_1.3B", "sky_df_14B", "sky_df_720p_14B", "ovi", "longcat_video", "longcat_avatar",
        "longcat_avatar_v1_5",
    }
)  # fmt: skip
# Architecture name prefixes of Wan2GP's other families, for the warning's wording only: any
# complete definition of an architecture not served is skipped, named or not.
_OTHER_FAMILIES = (
    ("ltx", "LTX Video"),
    ("hunyuan", "Hunyuan Video"),
    ("flux", "Flux"),
    ("pi_flux", "Flux"),
    ("qwen_image", "Qwen Image"),
    ("qwen3_tts", "Qwen3 TTS"),
    ("z_image", "Z-Image"),
    ("ace_step", "ACE-Step (audio)"),
    ("k5_", "Kandinsky 5"),
    ("hidream", "HiDream"),
    ("ideogram", "Ideogram"),
    ("krea", "Krea"),
    ("magi", "MAGI"),
    ("minimax", "MiniMax"),
    ("stable_audio", "Stable Audio"),
    ("chatterbox", "Chatterbox (TTS)"),
    ("index_tts", "IndexTTS"),
    ("heartmula", "HeartMuLa (audio)"),
    ("kugelaudio", "KugelAudio"),
    ("omnivoice", "OmniVoice"),
    ("dramabox", "DramaBox (audio)"),
    ("scenema", "Scenema (audio)"),
    ("joyai", "JoyAI"),
)

# Settings of Wan2GP definitions that drive its UI or features this worker does not have; they are
# accepted and recorded on the preset as ignored (a key outside these and the understood ones is an error).
IGNORED_SETTINGS = frozenset(
    {
        "prompt", "alt_prompt", "batch_size", "repeat_generation", "multi_images_gen_type", "multi_prompts_gen_type",
        "embedded_guidance_scale", "tea_cache_setting", "tea_cache_start_step_perc", "skip_steps_cache_type",
        "skip_steps_multiplier", "skip_steps_start_step_perc", "temporal_upsampling", "spatial_upsampling",
        "RIFLEx_setting", "perturbation_switch", "perturbation_layers", "perturbation_start_perc",
        "perturbation_end_perc", "cfg_star_switch", "cfg_zero_step", "apg_switch", "prompt_enhancer",
        "activated_loras", "loras_multipliers", "masking_strength", "denoising_strength", "sliding_window_size",
        "sliding_window_overlap",
        "sliding_window_color_correction_strength", "sliding_window_discard_last_frames", "video_prompt_type",
        "image_prompt_type", "audio_prompt_type", "audio_guidance_scale", "audio_scale", "model_mode",
        "remove_background_images_ref", "custom_settings", "force_fps", "control_net_weight",
        "control_net_weight_alt", "alt_guidance_scale", "alt_scale", "temperature", "top_p", "top_k",
        "duration_seconds", "pause_seconds", "self_refiner_setting", "motion_amplitude", "scheduler_type",
        # Wan2GP reads `sample_solver`; `sampler_solver` (two of its files) is a key it ignores as well.
        "sampler_solver", "sampling_steps", "shift", "image_mode",
    }
)  # fmt: skip
IGNORED_MODEL_KEYS = frozenset(
    {
        "visible", "auto_quantize", "settings_dir", "author", "profiles_dir", "profile_dirs", "preload_URLs",
        "video_prompt_enhancer_instructions", "lock_guidance_phases", "guidance_max_phases", "text_encoder_URLs",
        "text_encoder_folder", "attention", "image_outputs", "resolutions", "xresolutions", "source", "source2",
        "reference_image_enabled", "ref_img_index", "mask_frame_range", "frames_minimum", "frames_steps",
        "teacache_coefficients", "one_speaker_only", "multi_speakers_only", "dtype", "infos",
    }
)  # fmt: skip

# sample_solver values (Wan2GP's `sample_solvers` of its Wan models) and the diffusers scheduler each runs as.
SAMPLE_SOLVERS: Mapping[str, str] = {
    "unipc": "UniPCMultistepScheduler",
    "euler": "FlowMatchEulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
DEFAULT_SAMPLE_SOLVER = "unipc"  # Wan2GP's default; "" means it too
# Wan2GP solvers with no diffusers equivalent: CausVid's fixed timestep table and LCM + LTX.
REFUSED_SAMPLE_SOLVERS = {"causvid": "CausVid's fixed timestep table", "lcm": "LCM + LTX"}

_MAX_REFERENCE_DEPTH = 10  # Wan2GP's limit on chained URLs references (a longer chain is a cycle)


def served_architectures() -> tuple[str, ...]:
    """Every architecture name a preset may give: this worker's and Wan2GP's Wan ones."""
    return tuple(sorted(NATIVE_ARCHITECTURES | set(WAN2GP_ARCHITECTURES)))


def skip_reason(data: Mapping[str, Any]) -> str | None:
    """Why a complete definition of another family is skipped (None: it is one of ours, or partial).

    Only a complete definition (a `model` with `architecture` and `URLs`) of an architecture not served
    is skipped: a partial file (an override) with a bad architecture stays an error naming the field.
    """
    model = data.get("model")
    if not isinstance(model, Mapping) or "URLs" not in model:
        return None
    if data.get("sample_solver") in REFUSED_SAMPLE_SOLVERS:
        try:
            check_sample_solver(data["sample_solver"])
        except ValueError as exc:
            return str(exc)  # a Wan2GP solver with no diffusers scheduler: this definition cannot run here
    architecture = model.get("architecture")
    if not isinstance(architecture, str) or architecture in NATIVE_ARCHITECTURES | set(WAN2GP_ARCHITECTURES):
        return None
    if architecture in WAN_FAMILY_NOT_SERVED:
        family = "a Wan variant (its own transformer) this worker does not run"
    else:
        names = [name for prefix, name in _OTHER_FAMILIES if architecture.lower().startswith(prefix)]
        family = f"the {names[0]} family, not served here" if names else "not a Wan architecture served here"
    return f"architecture {architecture!r} is {family} (served: {', '.join(WAN2GP_ARCHITECTURES)})"


def normalize(data: dict[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """One definition file in this worker's terms, and the Wan2GP keys it ignores (dotted names).

    A Wan2GP architecture becomes ours (`t2v_2_2` -> `t2v`) with its group unless the file sets one,
    and is kept as `model.wan2gp_architecture` (base and LoRA folders depend on it); an empty
    `sample_solver` is Wan2GP's default.
    """
    out = dict(data)
    ignored = [key for key in out if key in IGNORED_SETTINGS]
    for key in ignored:
        del out[key]
    if out.get("sample_solver") == "":
        out["sample_solver"] = DEFAULT_SAMPLE_SOLVER
    model = out.get("model")
    if isinstance(model, dict):
        model = dict(model)
        model_ignored = [key for key in model if key in IGNORED_MODEL_KEYS]
        for key in model_ignored:
            del model[key]
        ignored += [f"model.{key}" for key in model_ignored]
        architecture = model.get("architecture")
        if isinstance(architecture, str) and architecture in WAN2GP_ARCHITECTURES:
            wan = WAN2GP_ARCHITECTURES[architecture]
            model["architecture"] = wan.architecture
            model.setdefault("group", wan.group)
            if architecture not in NATIVE_ARCHITECTURES:
                model["wan2gp_architecture"] = architecture
        out["model"] = model
    return out, tuple(ignored)


# ----- references between definitions ------------------------------------------------------------------


def _referenced_urls(raw: Mapping[str, dict[str, Any]], key: str, prop: str, stack: tuple[str, ...]) -> Any:
    """Follow `URLs` / `URLs2` strings that name other definitions (Wan2GP's get_model_filename rule)."""
    value = (raw[key].get("model") or {}).get(prop)
    if not isinstance(value, str) or value == key or value not in raw:
        return value
    if len(stack) > _MAX_REFERENCE_DEPTH or value in stack:
        raise PresetError(f"Invalid preset {stack[0]!r}: model.{prop} references loop: {' -> '.join((*stack, value))}")
    return _referenced_urls(raw, value, prop, (*stack, value))


def _module_variants(raw: Mapping[str, dict[str, Any]], owner: str, entry: Any) -> tuple[str, ...]:
    """One `modules` entry: a list of file variants, or the key of a definition whose only module it is."""
    if isinstance(entry, list) and entry and all(isinstance(v, str) for v in entry):
        return tuple(entry)
    if isinstance(entry, str):
        other = (raw.get(entry) or {}).get("model") or {}
        modules = other.get("modules")
        if not isinstance(modules, list) or len(modules) != 1:
            raise PresetError(
                f"Invalid preset {owner!r}: model.modules entry {entry!r} must name a definition with exactly one "
                f"module (Wan2GP's rule); {'it has ' + repr(modules) if entry in raw else 'no such definition'}"
            )
        return _module_variants(raw, entry, modules[0])
    raise PresetError(
        f"Invalid preset {owner!r}: model.modules entry {entry!r}: give a list of module file URLs/paths "
        "(variants of one module) or the key of a definition that has one"
    )


def resolve_references(raw: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Every definition with its `URLs` / `URLs2` / `modules` references replaced by what they name.

    `"URLs": "t2v_2_2"` takes that definition's URLs (and its `base`, when this one has none);
    `"URLs2": "t2v_2_2"` its URLs2, dropped when it has none (its URLs folder then holds both experts);
    a `modules` string takes the single module of the definition it names. A string that names no
    definition stays a source (a folder, a repo id or a file). Returns the resolved definitions and,
    apart, the keys whose references cannot be resolved (a loop, a module reference to a definition
    without one) with why: those are skipped, not fatal to the others.
    """
    resolved: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for key, data in raw.items():
        try:
            resolved[key] = _resolve_one(raw, key, data)
        except PresetError as exc:
            errors[key] = str(exc)
    return resolved, errors


def _resolve_one(raw: Mapping[str, dict[str, Any]], key: str, data: dict[str, Any]) -> dict[str, Any]:
    """One definition with its references resolved (PresetError: they cannot be)."""
    model = data.get("model")
    if not isinstance(model, dict):
        return data
    model = dict(model)
    for prop in ("URLs", "URLs2"):
        original = model.get(prop)
        value = _referenced_urls(raw, key, prop, (key,))
        if isinstance(original, str) and original in raw and original != key:
            target = raw[original].get("model") or {}
            if "base" not in model and isinstance(target.get("base"), str) and prop == "URLs":
                model["base"] = target["base"]
            if value is None:
                model.pop(prop, None)
                continue
        if value is not None:
            model[prop] = value
    if "modules" in model:
        entries = model["modules"]
        if not isinstance(entries, list):
            raise PresetError(f"Invalid preset {key!r}: model.modules must be a list, got {entries!r}")
        first, second = [], []
        for entry in entries:
            if isinstance(entry, dict):  # one file per expert (Wan2GP's dict modules)
                first.append(list(_module_variants(raw, key, entry.get("URLs"))))
                second.append(list(_module_variants(raw, key, entry.get("URLs2"))))
            else:  # the same file onto every transformer
                variants = list(_module_variants(raw, key, entry))
                first.append(variants)
                second.append(variants)
        model["modules"], model["modules2"] = first, second
    return {**data, "model": model}


# ----- what a resolved model needs -----------------------------------------------------------------------


def wan2gp_name(architecture: str, group: str, wan2gp_architecture: str | None) -> str | None:
    """The Wan2GP architecture a model is: the one its file named, else derived from ours and the group."""
    if wan2gp_architecture in WAN2GP_ARCHITECTURES:
        return wan2gp_architecture
    return _NATIVE_TO_WAN2GP.get((architecture, group))


def default_base(architecture: str, group: str, wan2gp_architecture: str | None) -> str | None:
    """The diffusers repo id that completes a single-file checkpoint of this architecture (None: unknown)."""
    name = wan2gp_name(architecture, group, wan2gp_architecture)
    return WAN2GP_ARCHITECTURES[name].base if name else None


def lora_subdirs(architecture: str, group: str, wan2gp_architecture: str | None) -> tuple[str, ...]:
    """LoRA subfolders looked in before a LoRA folder's root: ours (`wan/`, `wan2_2/`), then Wan2GP's."""
    name = wan2gp_name(architecture, group, wan2gp_architecture)
    theirs = WAN2GP_ARCHITECTURES[name].lora_dir if name else _LORA_DIRS_BY_ARCHITECTURE.get(architecture)
    return tuple(dict.fromkeys(d for d in (group, theirs) if d))


def check_sample_solver(value: Any) -> str:
    """A Wan2GP `sample_solver` this worker runs ("" is the default), or a PresetError-ready ValueError."""
    solver = DEFAULT_SAMPLE_SOLVER if value in (None, "") else value
    if isinstance(solver, str) and solver in SAMPLE_SOLVERS:
        return solver
    allowed = ", ".join(f"{name} ({scheduler})" for name, scheduler in SAMPLE_SOLVERS.items())
    why = f" ({REFUSED_SAMPLE_SOLVERS[solver]} has no diffusers scheduler)" if solver in REFUSED_SAMPLE_SOLVERS else ""
    raise ValueError(f"sample_solver {value!r} is not supported{why}; allowed: {allowed}")
