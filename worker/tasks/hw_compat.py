"""Headless-Wan2GP rows as our native tasks (issue 13).

Headless-Wan2GP ("HW") clients queue rows with HW's task types (`generate_video`, `single_image`,
`wan_2_2_t2i`, `individual_travel_segment`, `travel_orchestrator` with an `orchestrator_details` object, ...)
and Wan2GP's parameter names (`video_prompt_type` letter codes, `activated_loras`, `steps`, ...), plus
bookkeeping keys of their own (`task_id`, `project_id`, `run_id`, ...). `translate_hw_task` turns such a row into
one of our task types with our params, before validation:

- every HW key is either mapped onto ours, accepted at its "off" value, or recorded as bookkeeping (kept in
  `result_data.headless_wan2gp.ignored`); a key that is none of these still fails, naming it;
- every change HW itself would make (a resolution rounded down to a multiple of 16, CausVid's step clamp)
  is made the same way and recorded in `changes`;
- HW types we do not serve fail at once, naming the type and the ones we do.

A native row (our task type, only our keys, on a table of ours) is left alone: `translate_hw_task` returns None.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from worker.tasks.params import TASK_TYPE_MODES, InvalidTaskError

# HW's default model per task type (HW `task_conversion.db_task_to_generation_task`), used for HW rows.
HW_DEFAULT_MODELS: dict[str, str] = {
    "generate_video": "t2v",
    "t2v": "t2v",
    "t2v_22": "t2v_2_2",
    "vace": "vace_14B_cocktail_2_2",
    "vace_21": "vace_14B",
    "vace_22": "vace_14B_cocktail_2_2",
    "i2v": "i2v_14B",
    "i2v_22": "i2v_2_2",
    "wan_2_2_t2i": "t2v_2_2",
    "single_image": "t2v",
    "flf2v": "flf2v_14B",
    "ti2v": "ti2v_2_2",
    "individual_travel_segment": "vace_14B_cocktail_2_2",
}
# HW types that are one generation (the mode comes from the inputs and the model), or one frame of one.
HW_GENERATION_TYPES = frozenset({"generate_video", "single_image", "wan_2_2_t2i", "individual_travel_segment"})
HW_ONE_FRAME_TYPES = frozenset({"single_image", "wan_2_2_t2i"})
# HW types whose work we do not do (other model families, or HW-only post-processing).
HW_UNSERVED_TYPES = frozenset(
    {
        "flux", "hunyuan", "ltxv", "qwen_image", "qwen_image_2512", "qwen_image_edit", "qwen_image_hires",
        "qwen_image_style", "image_inpaint", "annotated_image_edit", "z_image_turbo", "z_image_turbo_i2i",
        "join_clips_orchestrator", "join_clips_segment", "edit_video_orchestrator", "inpaint_frames", "magic_edit",
        "generate_openpose", "rife_interpolate_images", "different_pose_orchestrator", "create_visualization",
        "extract_frame", "comfy",
    }
)  # fmt: skip

# Keys HW clients write for their own bookkeeping: recorded, never used.
BOOKKEEPING_KEYS = frozenset(
    {
        "task_id", "project_id", "run_id", "shot_id", "tool_type", "output_dir", "custom_output_dir",
        "output_sub_dir", "main_output_dir_for_run", "debug_mode_enabled", "debug", "skip_cleanup",
        "orchestrator_task_id", "orchestrator_task_id_ref", "orchestrator_run_id", "input_image_generation_ids",
        "generation_mode", "dimension_source", "show_input_images", "advanced_mode", "motion_mode",
        "amount_of_motion", "selected_phase_preset_id", "model_type", "add_in_position", "is_first_segment",
        "is_last_segment", "segment_index", "chain_segments", "num_new_segments_to_generate",
        "fade_in_params_json_str", "fade_out_params_json_str", "enhance_prompt", "enhanced_prompts_expanded",
        "random_seed", "thumbnail_url", "generation_name", "shot_name", "image_size", "output_format",
        "enable_base64_output", "enable_sync_mode",
    }
)  # fmt: skip
# Wan2GP / HW settings accepted only at the value that turns them off (anything else changes the output in a
# way we do not reproduce, so it fails naming the key and that value).
OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "keep_frames_video_guide": ("",),
    "keep_frames_video_source": ("",),
    "video_guide_outpainting": ("", "#"),
    "mask_expand": (0,),
    "tea_cache_setting": (0, 0.0),
    "tea_cache_start_step_perc": (0,),
    "RIFLEx_setting": (0,),
    "slg_switch": (0, False),
    "cfg_star_switch": (0, False),
    "cfg_zero_step": (-1,),
    "prompt_enhancer": ("",),
    "repeat_generation": (1,),
    "multi_images_gen_type": (0,),
    "remove_background_images_ref": (0, False),
    "temporal_upsampling": ("",),
    "spatial_upsampling": ("",),
    "film_grain_intensity": (0, 0.0),
    "apply_reward_lora": (False,),
    "colour_match_videos": (False,),
    "mask_active_frames": (False, True),  # HW's default is on; it only affects HW's own guide masks
    "use_lighti2x_lora": (False,),
    "use_uni3c": (False,),
    "use_svi": (False,),
    "after_first_post_generation_brightness": (0, 0.0),
    "after_first_post_generation_saturation": (1, 1.0),
    "continue_from_video_resolved_path": (None, ""),
    "video_source": (None, ""),
    "audio_guide": (None, ""),
    "sliding_window_size": (None,),
    "hires_scale": (None, 1, 1.0),
    "upscale_factor": (0, 0.0, 1, 1.0, None),
    "image_mask": (None, ""),
    "image_guide": (None, ""),
}
# Wan2GP / HW name -> ours (a value already given under our name wins).
RENAMES: dict[str, str] = {
    "steps": "num_inference_steps",
    "num_frames": "video_length",
    "frames": "video_length",
    "model_name": "model",
    "parsed_resolution_wh": "resolution",
    "seed_to_use": "seed",
    "control_net_weight": "control_scale",
    "activated_loras": "lora_names",
    "loras_multipliers": "lora_multipliers",
    "fps_helpers": "fps",
    "image_refs_paths": "image_refs",
    "start_image_url": "image_start",
    "end_image_url": "image_end",
}
# orchestrator_details key -> our travel_orchestrator key.
TRAVEL_RENAMES: dict[str, str] = {
    "input_image_paths_resolved": "input_images",
    "base_prompts_expanded": "base_prompts",
    "negative_prompts_expanded": "negative_prompts",
    "segment_frames_expanded": "segment_frames",
    "frame_overlap_expanded": "frame_overlap",
    "parsed_resolution_wh": "resolution",
    "model_name": "model",
    "seed_base": "seed_base",
    "steps": "num_inference_steps",
    "num_inference_steps": "num_inference_steps",
    "fps_helpers": "fps",
    "crossfade_sharp_amt": "crossfade_sharpen",
    "run_id": "run_id",
    "guidance_scale": "guidance_scale",
    "flow_shift": "flow_shift",
}
# Our generation keys (every mode's), which HW rows may also use as they are.
NATIVE_GENERATION_KEYS = frozenset(
    {
        "model", "prompt", "negative_prompt", "resolution", "video_length", "num_inference_steps", "guidance_scale",
        "guidance2_scale", "flow_shift", "switch_threshold", "seed", "fps", "memory_profile", "lora_names",
        "guidance_phases", "guidance3_scale", "switch_threshold2", "model_switch_phase", "sample_solver",
        "lora_multipliers", "parallel", "video_guide", "video_mask", "image_refs", "control_scale", "image_start",
        "image_end",
    }
)  # fmt: skip
# Wan2GP's video_prompt_type letters we honour: V (use the control video), M / A (use the mask; U: unchanged,
# i.e. A without masking), I (reference images). Others ask for preprocessing (P pose, D depth, ...) we do not do.
VIDEO_PROMPT_LETTERS = {"V": "control video", "M": "mask", "A": "mask", "U": "mask off", "I": "reference images"}
IMAGE_PROMPT_LETTERS = {"S": "start image", "E": "end image"}

# HW's CausVid defaults (HW `wgp_utils.generate_single_video` with use_causvid_lora).
CAUSVID_LORA = "Wan21_CausVid_14B_T2V_lora_rank32_v2.safetensors"
CAUSVID_MAX_STEPS = 9
SIDE_GRID_PX = 16  # HW `snap_resolution_to_model_grid`: each side rounded down to a multiple of 16
HW_CROSSFADE_SHARPEN = 0.3  # HW's travel stitch default for `crossfade_sharp_amt`
# Keys only HW rows have (the claim filter asks `is_hw_row` of every candidate row: computed once).
HW_ONLY_KEYS = frozenset(
    BOOKKEEPING_KEYS
    | set(OFF_VALUES)
    | set(RENAMES)
    | {"orchestrator_details", "additional_loras", "video_prompt_type", "image_prompt_type", "use_causvid_lora"}
    | {"phase_config", "loras"}
)
_RESOLUTION = re.compile(r"^\s*(\d{1,5})\s*[xX*]\s*(\d{1,5})\s*$")


@dataclass(frozen=True)
class HwTranslation:
    """A HW row as ours: the task type and params to validate and run, and what was done to get them."""

    task_type: str
    params: dict[str, Any]
    hw_task_type: str
    ignored: dict[str, Any] = field(default_factory=dict)
    changes: list[str] = field(default_factory=list)
    lora_urls: dict[str, str] = field(default_factory=dict)  # file name -> the URL the row gave

    def record(self) -> dict[str, Any]:
        """What `result_data.headless_wan2gp` holds."""
        record: dict[str, Any] = {"task_type": self.hw_task_type, "ran_as": self.task_type}
        if self.ignored:
            record["ignored"] = self.ignored
        if self.changes:
            record["changes"] = self.changes
        if self.lora_urls:
            record["lora_urls"] = self.lora_urls
        return record


def is_hw_row(task_type: str, params: Mapping[str, Any]) -> bool:
    """True when a row is written in HW's vocabulary (its task type or any of its keys)."""
    if task_type not in TASK_TYPE_MODES and task_type != "travel_orchestrator":
        return True
    return any(key in HW_ONLY_KEYS for key in params)


def translate_hw_task(
    task_type: str,
    params: dict[str, Any],
    *,
    hw_table: bool = False,
    architecture_of: Callable[[str], str | None] = lambda _model: None,
) -> HwTranslation | None:
    """The native task for a HW row, or None for a native row (see the module docstring).

    `hw_table`: the row is on an adopted HW table (HW's default models then apply even to plain rows).
    `architecture_of(model)`: the preset architecture of a model key (None when unknown), to pick the mode.
    Raises `InvalidTaskError` naming the HW type or key when the row cannot be served.
    """
    if task_type in ("travel_segment", "travel_stitch"):
        if "orchestrator_task_id_ref" in params and "orchestrator" not in params:
            raise InvalidTaskError(
                f"task_type {task_type!r} with orchestrator_task_id_ref was made by a Headless-Wan2GP orchestrator, "
                "whose segments only its own worker can run; re-queue the travel_orchestrator row and this worker "
                "plans its own segments"
            )
        return None
    if not hw_table and not is_hw_row(task_type, params):
        return None
    if task_type in HW_UNSERVED_TYPES:
        raise InvalidTaskError(
            f"Headless-Wan2GP task_type {task_type!r} is not served by wan-worker (it needs another model family "
            f"or HW's own post-processing); supported HW types: {', '.join(sorted(_served_types()))}"
        )
    if task_type == "travel_orchestrator":
        return _Translator(task_type).travel(params)
    if task_type not in TASK_TYPE_MODES and task_type not in HW_GENERATION_TYPES:
        raise InvalidTaskError(
            f"unknown task_type {task_type!r}; supported: {', '.join(sorted(_served_types()))} "
            "(our types and Headless-Wan2GP's that map onto them)"
        )
    return _Translator(task_type).generation(params, architecture_of)


def _is_off(value: Any, offs: tuple[Any, ...]) -> bool:
    """`value` is one of the off values (True is not 1, and 0 is not False, unless listed)."""
    for off in offs:
        if off is None or isinstance(off, bool):
            if value is off:
                return True
        elif not isinstance(value, bool) and value == off:
            return True
    return False


def _served_types() -> set[str]:
    return {*TASK_TYPE_MODES, *HW_GENERATION_TYPES, "travel_orchestrator"}


def round_resolution(value: Any, key: str = "resolution") -> tuple[str, str | None]:
    """`WxH` with each side rounded down to a multiple of 16, as HW does; (value, change note or None)."""
    match = _RESOLUTION.match(value) if isinstance(value, str) else None
    if match is None:
        raise InvalidTaskError(f"{key} = {value!r}: must look like '832x480' (width x height)")
    width, height = (int(side) // SIDE_GRID_PX * SIDE_GRID_PX for side in match.groups())
    rounded = f"{width}x{height}"
    original = f"{match.group(1)}x{match.group(2)}"
    note = None if rounded == original else f"{key} {original} rounded down to {rounded} (multiples of 16, as HW does)"
    return rounded, note


def lora_entry_name(entry: str) -> tuple[str, str | None]:
    """A LoRA entry as the file name we look up, and the URL it came from (None for a plain name)."""
    if entry.startswith(("http://", "https://")):
        # The engine's rule for a preset's LoRA URL (wan_engine.lora_downloads.lora_file_name), written here
        # again because importing that module loads torch, and validation must not.
        name = Path(unquote(urlsplit(entry).path)).name
        if not name.endswith(".safetensors"):
            raise InvalidTaskError(f"LoRA URL {entry!r} does not name a .safetensors file")
        return name, entry
    return entry, None


class _Translator:
    """One row's translation; collects what was ignored and changed."""

    def __init__(self, hw_task_type: str) -> None:
        self.hw_task_type = hw_task_type
        self.ignored: dict[str, Any] = {}
        self.changes: list[str] = []
        self.lora_urls: dict[str, str] = {}

    def done(self, task_type: str, params: dict[str, Any]) -> HwTranslation:
        return HwTranslation(task_type, params, self.hw_task_type, self.ignored, self.changes, self.lora_urls)

    # ---- one generation ------------------------------------------------------------------------

    def generation(self, params: dict[str, Any], architecture_of: Callable[[str], str | None]) -> HwTranslation:
        out: dict[str, Any] = {}
        video_prompt_type = params.get("video_prompt_type")
        image_prompt_type = params.get("image_prompt_type")
        extra_loras: list[tuple[str, Any]] = []
        causvid = False
        for key, value in params.items():
            if key in NATIVE_GENERATION_KEYS:
                out.setdefault(key, value)
            elif key in RENAMES:
                self._rename(key, value, out)
            elif key in ("video_prompt_type", "image_prompt_type"):
                continue
            elif key == "additional_loras":
                if not isinstance(value, dict):
                    raise InvalidTaskError(f"additional_loras = {value!r}: must be an object of LoRA -> multiplier")
                extra_loras.extend(value.items())
            elif key == "use_causvid_lora":
                causvid = value is True
                if value not in (True, False):
                    raise InvalidTaskError(f"use_causvid_lora = {value!r}: must be true or false")
            elif key == "base_prompt":
                out.setdefault("prompt", value)
            elif key == "individual_segment_params" and isinstance(value, dict):
                for inner_key, inner in value.items():
                    if inner_key in ("base_prompt", "prompt"):
                        out.setdefault("prompt", inner)
                    elif inner_key in RENAMES or inner_key in NATIVE_GENERATION_KEYS:
                        self._rename(inner_key, inner, out)
                    elif inner_key not in ("input_image_paths_resolved",):
                        self._bookkeeping_or_off(f"individual_segment_params.{inner_key}", inner_key, inner)
            elif key == "orchestrator_details" and isinstance(value, dict):
                self.ignored[key] = "orchestrator settings of a segment (the segment's own keys are used)"
            else:
                self._bookkeeping_or_off(key, key, value)
        if isinstance(out.get("resolution"), str):
            out["resolution"], note = round_resolution(out["resolution"])
            self._change(note)
        self._apply_letters(out, video_prompt_type, image_prompt_type)
        self._merge_loras(out, extra_loras)
        if causvid:
            self._causvid(out)
        one_frame = self.hw_task_type in HW_ONE_FRAME_TYPES
        if one_frame:
            if out.get("video_length", 1) != 1:
                self._change(f"video_length {out['video_length']} set to 1 ({self.hw_task_type} makes one image)")
            out["video_length"] = 1
        model = out.get("model") or HW_DEFAULT_MODELS.get(self.hw_task_type)
        if model is None:
            return self.done(self.hw_task_type, out)  # one of our types: its own default model
        out["model"] = model
        mode = self._mode(out, str(model), architecture_of)
        if self.hw_task_type == "individual_travel_segment" and mode == "vace":
            return self.done("travel_orchestrator", self._segment_as_travel(out))
        if self.hw_task_type in TASK_TYPE_MODES and TASK_TYPE_MODES[self.hw_task_type] == mode:
            return self.done(self.hw_task_type, out)
        return self.done(mode, out)

    def _segment_as_travel(self, out: dict[str, Any]) -> dict[str, Any]:
        """HW's `individual_travel_segment` on a VACE model: a travel of one segment between its two images."""
        start, end = out.pop("image_start", None), out.pop("image_end", None)
        if not start or not end:
            raise InvalidTaskError(
                "individual_travel_segment needs individual_segment_params.start_image_url and end_image_url "
                "(or image_start and image_end)"
            )
        if out.get("lora_names"):
            raise InvalidTaskError(
                "individual_travel_segment on a VACE model runs as a travel, and LoRAs in travel are not supported "
                "by wan-worker; remove lora_names / additional_loras, or use an i2v model"
            )
        travel: dict[str, Any] = {"input_images": [start, end], "base_prompts": out.pop("prompt", "")}
        renames = {"video_length": "segment_frames", "seed": "seed_base", "negative_prompt": "negative_prompts"}
        for key, value in out.items():
            ours = renames.get(key, key)
            if ours in ("model", "resolution", "num_inference_steps", "guidance_scale", "guidance2_scale",
                        "flow_shift", "switch_threshold", "fps", *renames.values()):  # fmt: skip
                travel[ours] = value
            else:
                raise InvalidTaskError(f"{key} is not supported in an individual_travel_segment on a VACE model")
        travel.setdefault("crossfade_sharpen", HW_CROSSFADE_SHARPEN)
        return travel

    def _rename(self, key: str, value: Any, out: dict[str, Any]) -> None:
        ours = RENAMES.get(key, key)
        if ours == "lora_multipliers" and isinstance(value, list):
            value = " ".join(str(v) for v in value)
        if ours == "image_refs" and isinstance(value, str):
            value = [value]
        if ours in out and out[ours] != value:
            self.ignored[key] = f"superseded by {ours}"
            return
        out[ours] = value

    def _bookkeeping_or_off(self, shown: str, key: str, value: Any) -> None:
        if key in BOOKKEEPING_KEYS:
            self.ignored[shown] = value
        elif key in OFF_VALUES:
            if not _is_off(value, OFF_VALUES[key]):
                allowed = ", ".join(repr(v) for v in OFF_VALUES[key])
                raise InvalidTaskError(
                    f"{shown} = {value!r} is a Wan2GP/Headless-Wan2GP setting wan-worker does not apply; "
                    f"only its off value is accepted ({allowed})"
                )
            self.ignored[shown] = value
        else:
            mapped = (
                TRAVEL_RENAMES if self.hw_task_type == "travel_orchestrator" else NATIVE_GENERATION_KEYS | set(RENAMES)
            )
            raise InvalidTaskError(
                f"unknown key {shown!r} (value {value!r}) in a Headless-Wan2GP {self.hw_task_type} task; keys "
                f"used: {', '.join(sorted(mapped))}; HW's bookkeeping keys and off-only settings are also accepted "
                "(README: Coming from Headless-Wan2GP)"
            )

    def _change(self, note: str | None) -> None:
        if note:
            self.changes.append(note)

    def _apply_letters(self, out: dict[str, Any], video_prompt_type: Any, image_prompt_type: Any) -> None:
        """Wan2GP's letter codes decide which of the given inputs are used."""
        if video_prompt_type is not None:
            letters = self._letters("video_prompt_type", video_prompt_type, VIDEO_PROMPT_LETTERS)
            self._keep_if(out, "video_guide", "V" in letters, "video_prompt_type", video_prompt_type)
            mask_on = "M" in letters or ("A" in letters and "U" not in letters)
            self._keep_if(out, "video_mask", mask_on, "video_prompt_type", video_prompt_type)
            self._keep_if(out, "image_refs", "I" in letters, "video_prompt_type", video_prompt_type)
            if "V" not in letters and "I" in letters and out.get("image_refs"):
                raise InvalidTaskError(
                    f"video_prompt_type = {video_prompt_type!r}: reference images without a control video ('V') "
                    "are not supported; add a video_guide and 'V'"
                )
        if image_prompt_type is not None:
            letters = self._letters("image_prompt_type", image_prompt_type, {**IMAGE_PROMPT_LETTERS})
            self._keep_if(out, "image_start", "S" in letters, "image_prompt_type", image_prompt_type)
            self._keep_if(out, "image_end", "E" in letters, "image_prompt_type", image_prompt_type)

    @staticmethod
    def _letters(key: str, value: Any, known: Mapping[str, str]) -> set[str]:
        if not isinstance(value, str):
            raise InvalidTaskError(f"{key} = {value!r}: must be a string of Wan2GP letter codes")
        unknown = sorted({letter for letter in value if letter not in known})
        if unknown:
            meanings = ", ".join(f"{letter} ({meaning})" for letter, meaning in known.items())
            raise InvalidTaskError(
                f"{key} = {value!r}: letter(s) {', '.join(unknown)} are not supported (they ask Wan2GP for "
                f"preprocessing wan-worker does not do); supported letters: {meanings}"
            )
        return set(value)

    def _keep_if(self, out: dict[str, Any], key: str, keep: bool, code_key: str, code: str) -> None:
        if not keep and out.get(key) not in (None, "", []):
            self.ignored[key] = f"not used: {code_key} {code!r} does not enable it"
            out.pop(key)
        elif not keep:
            out.pop(key, None)

    def _merge_loras(self, out: dict[str, Any], extra: list[tuple[str, Any]]) -> None:
        """`lora_names` + `additional_loras` as our names and one multiplier each (URLs become file names)."""
        names = out.get("lora_names")
        if names is None and not extra:
            return
        if isinstance(names, str):
            names = [names]
        if names is not None and not isinstance(names, list):
            raise InvalidTaskError(f"lora_names = {names!r}: must be a list of LoRA names")
        multipliers = str(out.get("lora_multipliers") or "").replace(",", " ").split() if names else []
        if names and multipliers and len(multipliers) != len(names):
            multipliers = []  # ours validates the count: keep the row's text as it was
        resolved: list[str] = []
        for entry in names or []:
            resolved.append(self._lora_name(entry))
        for entry, multiplier in extra:
            name = self._lora_name(entry)
            if name in resolved:
                continue
            resolved.append(name)
            if names and not multipliers:
                multipliers = ["1.0"] * len(names)
            multipliers.append(str(multiplier))
        out["lora_names"] = resolved
        if multipliers:
            out["lora_multipliers"] = " ".join(multipliers)

    def _lora_name(self, entry: Any) -> str:
        if not isinstance(entry, str) or not entry:
            raise InvalidTaskError(f"LoRA {entry!r}: must be a file name or an https URL of a .safetensors file")
        name, url = lora_entry_name(entry)
        if url is not None:
            self.lora_urls[name] = url
        return name

    def _causvid(self, out: dict[str, Any]) -> None:
        """HW's `use_causvid_lora`: its LoRA first at 1.0, at most 9 steps, guidance 1, flow shift 1."""
        names = list(out.get("lora_names") or [])
        multipliers = str(out.get("lora_multipliers") or "").split() or ["1.0"] * len(names)
        if CAUSVID_LORA not in names:
            names.insert(0, CAUSVID_LORA)
            multipliers.insert(0, "1.0")
        out["lora_names"] = names
        out["lora_multipliers"] = " ".join(multipliers)
        steps = out.get("num_inference_steps", 30)
        if not isinstance(steps, int) or steps > CAUSVID_MAX_STEPS or steps <= 0:
            out["num_inference_steps"] = CAUSVID_MAX_STEPS
            self._change(f"use_causvid_lora: num_inference_steps {steps} -> {CAUSVID_MAX_STEPS}")
        for key in ("guidance_scale", "flow_shift"):
            if out.get(key) != 1.0:
                self._change(f"use_causvid_lora: {key} {out.get(key)} -> 1.0")
                out[key] = 1.0

    def _mode(self, out: dict[str, Any], model: str, architecture_of: Callable[[str], str | None]) -> str:
        """The mode an HW generation runs as: the model's architecture decides, the inputs break ties."""
        if self.hw_task_type in TASK_TYPE_MODES:
            return TASK_TYPE_MODES[self.hw_task_type]
        architecture = architecture_of(model)
        if architecture in ("vace", "flf2v", "ti2v"):
            return architecture
        if architecture == "i2v" or out.get("image_start"):
            return "flf2v" if architecture == "flf2v" else "i2v"
        if out.get("video_guide"):
            return "vace"
        return "t2v"

    # ---- travel --------------------------------------------------------------------------------

    def travel(self, params: dict[str, Any]) -> HwTranslation:
        details = params.get("orchestrator_details")
        if details is None:
            return self.done("travel_orchestrator", self._native_travel(params))
        if not isinstance(details, dict):
            raise InvalidTaskError(f"orchestrator_details = {details!r}: must be an object")
        for key, value in params.items():
            if key != "orchestrator_details":
                self._bookkeeping_or_off(key, key, value)
        out: dict[str, Any] = {}
        for key, value in details.items():
            self._travel_key(key, value, details, out)
        if "base_prompts" not in out and isinstance(details.get("base_prompt"), str):
            out["base_prompts"] = details["base_prompt"]
        if isinstance(out.get("resolution"), str):
            out["resolution"], note = round_resolution(out["resolution"], "parsed_resolution_wh")
            self._change(note)
        images = out.get("input_images")
        if isinstance(images, list) and len(images) < 2:
            raise InvalidTaskError(
                f"input_image_paths_resolved has {len(images)} image(s): HW's single-image travel is not supported; "
                "travel needs at least 2 key images"
            )
        overlaps = out.get("frame_overlap")
        segments = len(images) - 1 if isinstance(images, list) else None
        if isinstance(overlaps, list) and segments is not None:
            # HW lists one overlap per segment and uses the first N-1 (one per join), 0 where one is missing.
            joins = (overlaps + [0] * segments)[: max(segments - 1, 0)]
            out["frame_overlap"] = joins if joins else 0
        out.setdefault("crossfade_sharpen", HW_CROSSFADE_SHARPEN)
        if "model" not in out:
            out["model"] = HW_DEFAULT_MODELS["vace"]
        return self.done("travel_orchestrator", out)

    def _native_travel(self, params: dict[str, Any]) -> dict[str, Any]:
        from worker.tasks.travel import TravelOrchestratorParams  # travel imports nothing from here

        out = {}
        for key, value in params.items():
            if key in BOOKKEEPING_KEYS and key not in TravelOrchestratorParams.model_fields:
                self.ignored[key] = value
            else:
                out[key] = value
        return out

    def _travel_key(self, key: str, value: Any, details: Mapping[str, Any], out: dict[str, Any]) -> None:
        if key in TRAVEL_RENAMES:
            out[TRAVEL_RENAMES[key]] = value
        elif key == "base_prompt":
            self.ignored[key] = value if "base_prompts_expanded" in details else "used as the prompt"
        elif key == "use_causvid_lora" and value is False:
            self.ignored[f"orchestrator_details.{key}"] = value
        elif key == "use_causvid_lora":
            raise InvalidTaskError(
                f"orchestrator_details.use_causvid_lora = {value!r}: LoRAs in travel are not supported by wan-worker; "
                "set it false (or run the segments as generation tasks with lora_names)"
            )
        elif key == "phase_config":
            self._phase_config(value, out)
        else:
            self._bookkeeping_or_off(f"orchestrator_details.{key}", key, value)

    def _phase_config(self, value: Any, out: dict[str, Any]) -> None:
        """HW's phase_config, where it only sets steps, guidance and shift; LoRAs in it are refused."""
        if not isinstance(value, dict):
            raise InvalidTaskError(f"orchestrator_details.phase_config = {value!r}: must be an object")
        phases = value.get("phases") or []
        if any(phase.get("loras") for phase in phases if isinstance(phase, dict)):
            raise InvalidTaskError(
                "orchestrator_details.phase_config has LoRAs: LoRAs in travel are not supported by wan-worker; "
                "remove them from phase_config (steps, guidance and flow_shift per phase are applied)"
            )
        if len(phases) > 2:
            raise InvalidTaskError(
                f"orchestrator_details.phase_config has {len(phases)} phases: travel runs at most 2 (one guidance "
                "scale per expert); use num_phases 2"
            )
        solver = value.get("sample_solver")
        if solver not in (None, "", "unipc"):
            raise InvalidTaskError(
                f"orchestrator_details.phase_config.sample_solver = {solver!r}: travel uses the model's own "
                "scheduler (unipc); use 'unipc' or leave it out"
            )
        steps = value.get("steps_per_phase")
        if isinstance(steps, list) and all(isinstance(s, int) for s in steps):
            out["num_inference_steps"] = sum(steps)
        if "flow_shift" in value:
            out["flow_shift"] = value["flow_shift"]
        scales = [phase.get("guidance_scale") for phase in phases if isinstance(phase, dict)]
        for key, scale in zip(("guidance_scale", "guidance2_scale"), scales, strict=False):
            if scale is not None:
                out[key] = float(scale)
        self.ignored["orchestrator_details.phase_config"] = {
            k: v for k, v in value.items() if k not in ("phases", "steps_per_phase", "flow_shift")
        }
