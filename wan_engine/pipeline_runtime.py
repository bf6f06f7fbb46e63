"""Loading a preset's diffusers pipeline and the per-call adjustments made to it.

Kept apart from the orchestrator so each piece (load, scheduler shift, prompt encode, VAE decode)
can be read and tested on its own; the Wan 2.2 expert switch lives in `wan_engine.experts`. All weights
are loaded from safetensors only.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan_engine.errors import InvalidRequestError, ModelUnavailableError
from wan_engine.fp8 import quantize_pipeline
from wan_engine.limits import DEFAULT_BOUNDARY_RATIO  # when URLs2 adds an expert to a folder without one
from wan_engine.loras import LoraState
from wan_engine.model_sources import ModelCheck
from wan_engine.presets import Preset
from wan_engine.single_file import load_single_file_transformers
from wan_engine.speed import SpeedReport, apply_speed_path
from wan_engine.vae_gate import VaeGate
from wan_engine.vae_precision import dtype_name, vae_dtype_from_env
from wan_engine.weight_files import WeightFiles, detach_file_mappings, pipeline_modules, weight_paths

log = logging.getLogger(__name__)

# ModelCheck.modules (Wan2GP module files, e.g. VACE) are merged onto the transformer at load
# (wan_engine.single_file.load_single_file_transformers -> load_transformer).
LOADS_MODULES = True

# Which diffusers pipeline classes serve each preset architecture.
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {
    "t2v": ("WanPipeline",),
    "ti2v": ("WanPipeline",),
    "vace": ("WanVACEPipeline",),
    "i2v": ("WanImageToVideoPipeline",),
    "flf2v": ("WanImageToVideoPipeline",),
}


# The diffusers classes the engine resolves by name (diffusers exports them lazily), schedulers included.
ENGINE_DIFFUSERS_CLASSES = (
    "AutoencoderKLWan",
    "WanTransformer3DModel",
    "WanVACETransformer3DModel",
    "ModelMixin",
    *sorted({name for names in PIPELINE_CLASSES.values() for name in names}),
    "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
    "DPMSolverMultistepScheduler",
)


def import_diffusers_classes() -> None:
    """Resolve the engine's lazily exported diffusers classes now, in the calling thread.

    diffusers imports a class's module on first attribute access. Two threads doing that at once (the
    queue's worker thread loading a model while the caller's `submit_task` looks up a scheduler class) can
    each see the other's module half-initialised and fail with `module 'diffusers' has no attribute ...`;
    `HeadlessTaskQueue` calls this before it starts its thread."""
    import diffusers

    for name in ENGINE_DIFFUSERS_CLASSES:
        getattr(diffusers, name)


@dataclass
class LoadedModel:
    """A resident pipeline and what is needed to restore it after each call."""

    preset: Preset
    pipe: Any  # a diffusers DiffusionPipeline
    base_scheduler: Any
    device: torch.device
    dtype: torch.dtype
    source: Path
    default_boundary_ratio: float | None = None
    hooks: list[Any] = field(default_factory=list)
    loras: LoraState = field(default_factory=LoraState)
    image_view: Any = None  # TI2V: a WanImageToVideoPipeline over the same modules, built on first use
    speed: SpeedReport | None = None  # what the CUDA speed path did (attention kernel, compiled blocks)
    profile: str | None = None  # memory profile applied (None: as loaded)
    loaded_on_device: bool = True  # False: a fresh load kept in host RAM until a task's profile places it
    fp8: dict[str, Any] | None = None  # per transformer, what fp8 quantisation did (None: model dtype)
    weight_files: WeightFiles = field(default_factory=WeightFiles)  # identities at load: re-checked per task
    reloaded_because: str | None = None  # set by the orchestrator when this load replaced changed files
    # The VAE's users on two threads (the loop, the output finisher's overlapped decode: wan_engine.decode_overlap)
    # take turns: diffusers' Wan VAE keeps its convolution caches on the module.
    vae_gate: VaeGate = field(default_factory=VaeGate, repr=False, compare=False)

    @property
    def resident(self) -> bool:
        """All weights on the execution device (so parking it in pinned RAM is one device-to-host copy)."""
        if self.profile is None:
            return self.loaded_on_device
        return self.profile == ("gpu" if self.device.type == "cuda" else "cpu")

    @property
    def is_dual_expert(self) -> bool:
        """True when the loaded pipeline really holds a second (low-noise) transformer."""
        return getattr(self.pipe, "transformer_2", None) is not None

    @property
    def main_transformer(self) -> Any:
        """The transformer that defines the model's shape (the high-noise expert on Wan 2.2)."""
        return self.pipe.transformer if self.pipe.transformer is not None else self.pipe.transformer_2

    @property
    def side_multiple(self) -> int:
        """Width and height must be multiples of this: VAE compression x transformer patch size."""
        return int(self.pipe.vae_scale_factor_spatial * self.main_transformer.config.patch_size[1])

    @property
    def expand_timesteps(self) -> bool:
        """True for Wan 2.2 TI2V-5B-style pipelines (per-token timesteps; image-conditioned through latents)."""
        return bool(self.pipe.config.get("expand_timesteps", False))

    def image_pipeline(self) -> Any:
        """The pipeline that takes a start (and end) image: the loaded one, or for TI2V an I2V view of it.

        diffusers runs TI2V-5B image-to-video through WanImageToVideoPipeline with expand_timesteps;
        the view shares every module with the loaded WanPipeline, so it costs no memory.
        """
        if type(self.pipe).__name__ == "WanImageToVideoPipeline":
            return self.pipe
        if self.image_view is None:
            from diffusers import WanImageToVideoPipeline

            components = {k: v for k, v in self.pipe.components.items() if k in _I2V_COMPONENTS}
            self.image_view = WanImageToVideoPipeline(
                **components,
                boundary_ratio=self.pipe.config.boundary_ratio,
                expand_timesteps=self.expand_timesteps,
            )
            self.image_view.set_progress_bar_config(disable=True)
        return self.image_view


_I2V_COMPONENTS = ("tokenizer", "text_encoder", "vae", "scheduler", "transformer", "transformer_2")


def vae_dtype_name(pipe: Any) -> str:
    """The dtype the pipeline's VAE runs in (`float32`, `float16`, `bfloat16`), as result_data records it."""
    return dtype_name(pipe.vae.dtype)


def _pipeline_class_name(folder: Path) -> str:
    return str(json.loads((folder / "model_index.json").read_text()).get("_class_name", ""))


def _load_expert(path2: Path, transformer_cls: Any, dtype: torch.dtype, **options: Any) -> Any:
    """The low-noise expert named by URLs2: a transformer folder, or a pipeline folder's transformer."""
    subfolder = "transformer" if (path2 / "model_index.json").is_file() else None
    return transformer_cls.from_pretrained(path2, subfolder=subfolder, dtype=dtype, use_safetensors=True, **options)


@functools.cache
def diffusers_has_disable_mmap() -> bool:
    """Whether the installed diffusers' `from_pretrained` takes `disable_mmap` (0.42 does)."""
    import diffusers

    try:
        return "disable_mmap" in inspect.getsource(diffusers.ModelMixin.from_pretrained)
    except (OSError, TypeError):  # no source (frozen install): do not guess, detach_weights covers it
        return False


def detach_weights(pipe: Any) -> int:
    """Make sure no parameter/buffer of `pipe` aliases a memory-mapped weight file; returns the bytes copied.

    A tensor viewing the mapping sees an in-place rewrite of the file (different frames from the same seed)
    and raises SIGBUS when the file is truncated; a private copy sees neither. Weights already on the GPU
    are copies and are skipped, so on a CUDA-resident load this only scans.
    """
    started = time.perf_counter()
    copied = detach_file_mappings(pipeline_modules(pipe))
    if copied:
        log.info(
            "copied %.1f MB of memory-mapped weights into RAM in %.3fs", copied / 1e6, time.perf_counter() - started
        )
    return copied


def load_pipeline(
    preset: Preset,
    check: ModelCheck,
    device: torch.device,
    dtype: torch.dtype,
    *,
    fp8: bool = False,
    resident: bool = True,
    models_dir: Path | None = None,
    vae_dtype: torch.dtype | None = None,
) -> LoadedModel:
    """Load the preset's pipeline from a checked folder, the VAE in `vae_dtype` (default: WAN_VAE_PRECISION,
    float16 on CUDA and float32 elsewhere unless set; wan_engine.vae_precision).

    `resident`: move it onto `device` now; otherwise it stays in host RAM (`loaded_on_device` False)
    and the first task's memory profile places it, so a model larger than the VRAM budget never has
    to fit whole. `fp8`: quantise the transformer blocks (wan_engine.fp8) before they reach the device.
    `models_dir`: the worker's models folder (its `.compile_cache` holds the compile caches).
    """
    import diffusers

    assert check.path is not None, "load_pipeline needs a present ModelCheck"
    class_name = _pipeline_class_name(check.path)
    expected = PIPELINE_CLASSES[preset.model.architecture]
    if class_name not in expected:
        raise ModelUnavailableError(
            f"Model {preset.key!r}: {check.path} holds a {class_name or 'unknown'} pipeline, but the "
            f"preset's architecture {preset.model.architecture!r} needs {' or '.join(expected)}; "
            "fix the preset's URLs."
        )
    # Stat before reading: a file rewritten while it is being loaded then shows as changed at the next task.
    weight_files = WeightFiles.record(weight_paths(check))
    # Weights that stay in host RAM are read into memory rather than mapped (diffusers components; the text
    # encoder and single files are copied by detach_weights below). A CUDA-resident load copies them to
    # the device anyway, where reading the file into RAM first would only add a host copy.
    options: dict[str, Any] = {}
    if (device.type != "cuda" or not resident) and diffusers_has_disable_mmap():
        options["disable_mmap"] = True
    # The VAE's own dtype (WAN_VAE_PRECISION): float16 on CUDA as Wan2GP runs it (float16's mantissa, not bf16's:
    # Wan's VAE is numerically sensitive), float32 elsewhere. The pipeline keeps a VAE passed in as it is.
    vae_dtype = vae_dtype_from_env(device) if vae_dtype is None else vae_dtype
    vae = diffusers.AutoencoderKLWan.from_pretrained(
        check.path, subfolder="vae", dtype=vae_dtype, use_safetensors=True, **options
    )
    kwargs: dict[str, Any] = {"vae": vae, "dtype": dtype, "use_safetensors": True, **options}
    kwargs.update(load_single_file_transformers(check, class_name, dtype))  # URLs/URLs2 as .safetensors files
    if check.path2 is not None:
        is_vace = class_name == "WanVACEPipeline"
        transformer_cls = diffusers.WanVACETransformer3DModel if is_vace else diffusers.WanTransformer3DModel
        kwargs["transformer_2"] = _load_expert(check.path2, transformer_cls, dtype, **options)
    pipe = getattr(diffusers, class_name).from_pretrained(check.path, **kwargs)
    if "transformer_2" in kwargs and pipe.config.boundary_ratio is None:
        pipe.register_to_config(boundary_ratio=DEFAULT_BOUNDARY_RATIO)
    pipe.set_progress_bar_config(disable=True)  # progress is reported as events, not a log bar
    fp8_reports = quantize_pipeline(pipe, device) if fp8 else None
    if resident:
        pipe.to(device)
    detach_weights(pipe)  # after the move: what went to the GPU is a copy already; the rest is copied here
    # CUDA only: probed attention kernel + regional compile (WAN_SPEED); caches in <models dir>/.compile_cache
    speed = apply_speed_path(pipe, device, models_dir=models_dir)
    return LoadedModel(
        preset=preset,
        pipe=pipe,
        base_scheduler=pipe.scheduler,
        device=device,
        dtype=dtype,
        source=check.path,
        default_boundary_ratio=pipe.config.boundary_ratio,
        speed=speed,
        loaded_on_device=resident,
        fp8=fp8_reports,
        weight_files=weight_files,
    )


def scheduler_with_shift(base_scheduler: Any, flow_shift: float) -> Any:
    """A fresh scheduler of the same class and config, with the requested flow shift."""
    config = base_scheduler.config
    if "flow_shift" in config:  # UniPC / DPM-Solver with flow sigmas (the Wan repos' default)
        return type(base_scheduler).from_config(config, flow_shift=flow_shift)
    if "shift" in config:  # FlowMatchEulerDiscreteScheduler
        return type(base_scheduler).from_config(config, shift=flow_shift)
    raise ModelUnavailableError(
        f"scheduler {type(base_scheduler).__name__} has no flow shift setting; use a flow-matching scheduler"
    )


@contextmanager
def scheduled(loaded: LoadedModel, flow_shift: float, pipe: Any = None) -> Iterator[Any]:
    """Apply a call's flow shift to `pipe` (default: the loaded one); restore the base scheduler after.

    The expert boundary of a two-expert model is applied separately (`wan_engine.experts.expert_boundary`).
    """
    pipe = loaded.pipe if pipe is None else pipe
    pipe.scheduler = scheduler_with_shift(loaded.base_scheduler, flow_shift)
    try:
        yield pipe
    finally:
        pipe.scheduler = loaded.base_scheduler


def check_image_conditioning(loaded: LoadedModel, *, has_end: bool) -> None:
    """Refuse image inputs the loaded transformer cannot take (the pipelines would fail obscurely).

    Wan 2.1 I2V: start image only (CLIP). Wan 2.1 FLF2V: start and end (CLIP over both, with a learnt
    position embedding). Wan 2.2 I2V: start, optionally end (latents only). TI2V-5B: start only.
    """
    config = loaded.main_transformer.config
    key = loaded.preset.key
    if loaded.expand_timesteps and has_end:
        raise InvalidRequestError(
            f"Model {key!r} (TI2V) conditions on a start image only; image_end needs a first-last-frame model "
            "(flf2v_14B) or a Wan 2.2 I2V model (i2v_2_2)."
        )
    if config.image_dim is not None and config.pos_embed_seq_len is not None and not has_end:
        raise InvalidRequestError(f"Model {key!r} is a first-last-frame model: give image_end as well.")
    if config.image_dim is not None and config.pos_embed_seq_len is None and has_end:
        raise InvalidRequestError(
            f"Model {key!r} (Wan 2.1 I2V) takes a start image only; for image_end use a first-last-frame "
            "model (flf2v_14B) or a Wan 2.2 I2V model (i2v_2_2)."
        )


@torch.no_grad()
def encode_prompts(
    pipe: Any, prompt: str, negative_prompt: str, *, do_cfg: bool, device: torch.device, max_length: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """UMT5 embeddings of the prompt (and of the negative prompt when CFG is on).

    Uses WanPipeline's implementation for every Wan pipeline class: the VACE / I2V modules of
    diffusers 0.42 call `ftfy` unconditionally and fail when it is not installed, while
    WanPipeline's copy of the same code checks for it. The text encoder is shared, so the
    embeddings are identical.
    """
    from diffusers import WanPipeline

    def embed(text: str) -> torch.Tensor:
        encode = WanPipeline._get_t5_prompt_embeds
        return encode(pipe, prompt=text, max_sequence_length=max_length, device=device)

    return embed(prompt), embed(negative_prompt) if do_cfg else None


def expected_frame_shape(pipe: Any, latents: torch.Tensor, num_reference_images: int = 0) -> tuple[int, int, int]:
    """(frames, height, width) that `decode_latents` will return for `latents` (B, C, T, h, w)."""
    latent_frames = int(latents.shape[2]) - num_reference_images
    temporal, spatial = int(pipe.vae_scale_factor_temporal), int(pipe.vae_scale_factor_spatial)
    return (latent_frames - 1) * temporal + 1, int(latents.shape[3]) * spatial, int(latents.shape[4]) * spatial


@torch.no_grad()
def decode_latents(
    pipe: Any, latents: torch.Tensor, num_reference_images: int = 0, *, tiled: bool = False
) -> np.ndarray:
    """Decode Wan latents to frames (F, H, W, 3) float in [0, 1], as the diffusers pipelines do.

    `tiled`: decode in spatial tiles whatever the VAE's own tiling setting (less memory; the overlapped
    decode's out-of-memory retry, which must not switch tiling on for the loop's users of the VAE)."""
    vae = pipe.vae
    # The execution device, not the VAE's weights' device: under model offload those are in host RAM
    # until decode() moves them (diffusers' `_execution_device` follows the offload hooks).
    device = getattr(pipe, "_execution_device", None) or next(vae.parameters()).device
    latents = latents[:, :, num_reference_images:].to(device, vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    z = latents / inv_std + mean
    video = (vae.tiled_decode if tiled else vae.decode)(z, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")
    return np.asarray(frames[0])
