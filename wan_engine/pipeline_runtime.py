"""Loading a preset's diffusers pipeline and the per-call adjustments made to it.

Kept apart from the orchestrator so each piece (load, scheduler shift, expert hooks, VAE decode)
can be read and tested on its own. All weights are loaded from safetensors only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from wan_engine.errors import InvalidRequestError, ModelUnavailableError
from wan_engine.fp8 import quantize_pipeline
from wan_engine.loras import LoraState
from wan_engine.model_sources import ModelCheck
from wan_engine.presets import Preset
from wan_engine.single_file import load_single_file_transformers
from wan_engine.speed import SpeedReport, apply_speed_path

# Which diffusers pipeline classes serve each preset architecture.
PIPELINE_CLASSES: dict[str, tuple[str, ...]] = {
    "t2v": ("WanPipeline",),
    "ti2v": ("WanPipeline",),
    "vace": ("WanVACEPipeline",),
    "i2v": ("WanImageToVideoPipeline",),
    "flf2v": ("WanImageToVideoPipeline",),
}
DEFAULT_BOUNDARY_RATIO = 0.875  # used only when URLs2 adds an expert to a folder that has no boundary


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


def _pipeline_class_name(folder: Path) -> str:
    return str(json.loads((folder / "model_index.json").read_text()).get("_class_name", ""))


def _load_expert(path2: Path, transformer_cls: Any, dtype: torch.dtype) -> Any:
    """The low-noise expert named by URLs2: a transformer folder, or a pipeline folder's transformer."""
    subfolder = "transformer" if (path2 / "model_index.json").is_file() else None
    return transformer_cls.from_pretrained(path2, subfolder=subfolder, dtype=dtype, use_safetensors=True)


def load_pipeline(
    preset: Preset,
    check: ModelCheck,
    device: torch.device,
    dtype: torch.dtype,
    *,
    fp8: bool = False,
    resident: bool = True,
) -> LoadedModel:
    """Load the preset's pipeline from a checked folder (VAE kept in float32).

    `resident`: move it onto `device` now; otherwise it stays in host RAM (`loaded_on_device` False)
    and the first task's memory profile places it, so a model larger than the VRAM budget never has
    to fit whole. `fp8`: quantise the transformer blocks (wan_engine.fp8) before they reach the device.
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
    # Wan's VAE is numerically sensitive: decode in float32 even when the transformers run in bf16.
    vae = diffusers.AutoencoderKLWan.from_pretrained(
        check.path, subfolder="vae", dtype=torch.float32, use_safetensors=True
    )
    kwargs: dict[str, Any] = {"vae": vae, "dtype": dtype, "use_safetensors": True}
    kwargs.update(load_single_file_transformers(check, class_name, dtype))  # URLs/URLs2 as .safetensors files
    if check.path2 is not None:
        is_vace = class_name == "WanVACEPipeline"
        transformer_cls = diffusers.WanVACETransformer3DModel if is_vace else diffusers.WanTransformer3DModel
        kwargs["transformer_2"] = _load_expert(check.path2, transformer_cls, dtype)
    pipe = getattr(diffusers, class_name).from_pretrained(check.path, **kwargs)
    if "transformer_2" in kwargs and pipe.config.boundary_ratio is None:
        pipe.register_to_config(boundary_ratio=DEFAULT_BOUNDARY_RATIO)
    pipe.set_progress_bar_config(disable=True)  # progress is reported as events, not a log bar
    fp8_reports = quantize_pipeline(pipe, device) if fp8 else None
    if resident:
        pipe.to(device)
    speed = apply_speed_path(pipe, device)  # CUDA only: probed attention kernel + regional compile (WAN_SPEED)
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
def scheduled(loaded: LoadedModel, flow_shift: float, boundary_ratio: float | None, pipe: Any = None) -> Iterator[Any]:
    """Apply a call's flow shift (and expert boundary) to `pipe` (default: the loaded one); restore both."""
    pipe = loaded.pipe if pipe is None else pipe
    pipe.scheduler = scheduler_with_shift(loaded.base_scheduler, flow_shift)
    if loaded.is_dual_expert:
        pipe.register_to_config(boundary_ratio=boundary_ratio)
    try:
        yield pipe
    finally:
        pipe.scheduler = loaded.base_scheduler
        if loaded.is_dual_expert:
            pipe.register_to_config(boundary_ratio=loaded.default_boundary_ratio)


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


def experts_for_steps(
    loaded: LoadedModel, flow_shift: float, num_steps: int, boundary_ratio: float | None
) -> list[str]:
    """Which expert the pipeline will run at each step ("high" throughout on one transformer).

    Computed ahead of the call, from the same scheduler the call uses, with the pipelines' own rule
    (timestep >= boundary_ratio x num_train_timesteps -> high-noise expert).
    """
    scheduler = scheduler_with_shift(loaded.base_scheduler, flow_shift)
    scheduler.set_timesteps(num_steps, device="cpu")
    timesteps = [int(t) for t in scheduler.timesteps]
    if len(set(timesteps)) < len(timesteps):
        # Integer timesteps collide when the steps are many for the shift; multistep solvers (UniPC)
        # then fail deep inside the loop, so refuse up front with the largest count that works.
        limit = _max_distinct_steps(loaded, flow_shift, num_steps)
        raise InvalidRequestError(
            f"num_inference_steps={num_steps} at flow_shift {flow_shift:g} repeats scheduler timesteps "
            f"({type(scheduler).__name__}); use at most {limit} steps or a smaller flow_shift"
        )
    if not loaded.is_dual_expert or boundary_ratio is None:
        return ["high"] * num_steps
    boundary = boundary_ratio * scheduler.config.num_train_timesteps
    return ["high" if float(t) >= boundary else "low" for t in scheduler.timesteps]


def _max_distinct_steps(loaded: LoadedModel, flow_shift: float, upper: int) -> int:
    """The largest step count below `upper` whose timesteps are all distinct (binary search)."""
    low, high = 1, upper - 1
    while low < high:
        middle = (low + high + 1) // 2
        scheduler = scheduler_with_shift(loaded.base_scheduler, flow_shift)
        scheduler.set_timesteps(middle, device="cpu")
        timesteps = [int(t) for t in scheduler.timesteps]
        if len(set(timesteps)) == len(timesteps):
            low = middle
        else:
            high = middle - 1
    return low


class ExpertRecorder:
    """Counts transformer calls per denoising step with forward pre-hooks (proof of which expert ran)."""

    def __init__(self) -> None:
        self.step = 0
        self.calls: list[tuple[int, str]] = []  # (step index, "high" | "low")

    def reset(self) -> None:
        """Forget what was recorded (a generation retried after an out-of-memory error)."""
        self.step = 0
        self.calls.clear()

    def _hook(self, name: str) -> Any:
        def record(_module: Any, _args: Any) -> None:
            self.calls.append((self.step, name))

        return record

    @contextmanager
    def attached(self, pipe: Any) -> Iterator[ExpertRecorder]:
        """Hook `transformer` as the high-noise expert and `transformer_2` as the low-noise one."""
        handles = []
        for attr, name in (("transformer", "high"), ("transformer_2", "low")):
            module = getattr(pipe, attr, None)
            if module is not None:
                handles.append(module.register_forward_pre_hook(self._hook(name)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def experts_per_step(self, num_steps: int) -> tuple[str, ...]:
        """The expert that ran each step; "mixed" would reveal a step served by both (never expected)."""
        per_step: list[set[str]] = [set() for _ in range(num_steps)]
        for step, name in self.calls:
            if step < num_steps:
                per_step[step].add(name)
        return tuple(next(iter(s)) if len(s) == 1 else ("mixed" if s else "none") for s in per_step)

    def calls_per_step(self, num_steps: int) -> tuple[int, ...]:
        """Transformer forward calls in each step (2 with classifier-free guidance, 1 without)."""
        counts = [0] * num_steps
        for step, _name in self.calls:
            if step < num_steps:
                counts[step] += 1
        return tuple(counts)


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


@torch.no_grad()
def decode_latents(pipe: Any, latents: torch.Tensor, num_reference_images: int = 0) -> np.ndarray:
    """Decode Wan latents to frames (F, H, W, 3) float in [0, 1], as the diffusers pipelines do."""
    vae = pipe.vae
    # The execution device, not the VAE's weights' device: under model offload those are in host RAM
    # until decode() moves them (diffusers' `_execution_device` follows the offload hooks).
    device = getattr(pipe, "_execution_device", None) or next(vae.parameters()).device
    latents = latents[:, :, num_reference_images:].to(device, vae.dtype)
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    frames = pipe.video_processor.postprocess_video(video, output_type="np")
    return np.asarray(frames[0])
