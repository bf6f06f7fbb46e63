"""Every bound on a task's / a generation's parameters, defined once.

The worker's pydantic schema (`worker.tasks.params`, `worker.tasks.travel`), the engine's resolver
(`wan_engine.generation_params`), the orchestrator (`headless_wgp`) and the runner read their limits
from here, so a value accepted by `submit_task` is accepted by the worker and the engine alike.
Units are in the names or the comments. This module imports nothing (no torch, no diffusers, no
pydantic): the live layer and the CLI import it cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

# ---- denoising ----------------------------------------------------------------------------------
MIN_STEPS: Final = 1  # num_inference_steps (denoising steps); a scheduler may cap it lower (worker.tasks.validation)
MAX_STEPS: Final = 1000
MIN_GUIDANCE: Final = 0.0  # guidance_scale / guidance2_scale (classifier-free guidance weight, unitless)
MAX_GUIDANCE: Final = 50.0
MAX_FLOW_SHIFT: Final = 100.0  # flow_shift (scheduler sigma shift, unitless); must be > 0 (exclusive bound)
NUM_TRAIN_TIMESTEPS: Final = 1000  # the Wan schedulers' num_train_timesteps: switch_threshold's scale
MIN_SWITCH_THRESHOLD: Final = 0.0  # switch_threshold (timestep, out of NUM_TRAIN_TIMESTEPS) where a Wan 2.2
MAX_SWITCH_THRESHOLD: Final = float(NUM_TRAIN_TIMESTEPS)  # A14B model hands over to its low-noise expert
DEFAULT_SWITCH_THRESHOLD: Final = 875  # Wan 2.2 T2V A14B's boundary (timestep out of 1000)
# The same boundary as diffusers' `boundary_ratio` (switch_threshold / num_train_timesteps).
DEFAULT_BOUNDARY_RATIO: Final = DEFAULT_SWITCH_THRESHOLD / NUM_TRAIN_TIMESTEPS
# Wan2GP's guidance phases (guidance_phases): 1, 2 (switch_threshold) or 3 (also switch_threshold2, a
# timestep out of NUM_TRAIN_TIMESTEPS at most switch_threshold); model_switch_phase is 1 or 2.
MIN_GUIDANCE_PHASES: Final = 1
MAX_GUIDANCE_PHASES: Final = 3

# ---- video shape --------------------------------------------------------------------------------
MIN_FRAMES: Final = 1  # video_length (frames); the engine rounds up to 4N+1, which must stay <= MAX_FRAMES
MAX_FRAMES: Final = 1001
MIN_SIDE_PX: Final = 16  # resolution "WxH": each side in pixels
MAX_SIDE_PX: Final = 4096
SIDE_MULTIPLE_PX: Final = 16  # each side a multiple of this (a model may need a larger multiple)
MIN_FPS: Final = 1  # fps of the written video (frames per second)
MAX_FPS: Final = 120

# ---- seeds --------------------------------------------------------------------------------------
RANDOM_SEED: Final = -1  # seed -1: draw a random one
MAX_SEED: Final = 2**63 - 1  # the largest seed torch.Generator.manual_seed takes (signed 64-bit)

# ---- text and inputs ----------------------------------------------------------------------------
MAX_PROMPT_CHARS: Final = 10_000  # prompt / negative_prompt / travel prompts (characters)
MAX_MODEL_KEY_CHARS: Final = 128  # model (preset key, characters)
MAX_PATH_CHARS: Final = 4096  # one input file path (characters)
MAX_PARAMS_BYTES: Final = 256 * 1024  # a row's params JSON text (UTF-8 bytes)
MAX_PARAMS_DEPTH: Final = 32  # nesting levels of arrays/objects in a params text (real params use 2 or 3)
MAX_LORAS: Final = 16  # lora_names (LoRA files per generation)
MAX_LORA_MULTIPLIERS_CHARS: Final = 1000  # lora_multipliers text (characters)
MAX_IMAGE_REFS: Final = 16  # VACE image_refs (reference images per generation)
MIN_CONTROL_SCALE: Final = 0.0  # VACE control_scale (conditioning weight, unitless)
MAX_CONTROL_SCALE: Final = 10.0
DEFAULT_CONTROL_SCALE: Final = 1.0

# ---- travel -------------------------------------------------------------------------------------
MIN_TRAVEL_IMAGES: Final = 2  # travel_orchestrator input_images (key frames)
MAX_TRAVEL_IMAGES: Final = 64
MAX_CROSSFADE_SHARPEN: Final = 10.0  # crossfade_sharpen (unitless, >= 0)

# ---- scheduling ---------------------------------------------------------------------------------
MAX_PARALLEL: Final = 64  # parallel (GPUs one generation is split over)
MIN_PRIORITY: Final = -1000  # task priority; a typo such as 10**9 would starve every other task
MAX_PRIORITY: Final = 1000

# ---- modes --------------------------------------------------------------------------------------
# The preset architectures each task mode accepts (what the weights can do). The orchestrator's
# text-to-video method also takes a VACE model (no guide video: plain T2V); that is its own business.
MODE_ARCHITECTURES: Final[Mapping[str, tuple[str, ...]]] = MappingProxyType(
    {
        "t2v": ("t2v", "ti2v"),
        "vace": ("vace",),
        "i2v": ("i2v", "flf2v", "ti2v"),
        "flf2v": ("flf2v", "i2v"),
        "ti2v": ("ti2v",),
    }
)

# ---- input media (images, guide / mask videos), checked on the file's header before decoding ----
MAX_INPUT_PIXELS: Final = 4096 * 4096  # one input image or one video frame (width x height, pixels): ~48 MiB as RGB
MAX_INPUT_FRAMES: Final = 10_000  # frames in one input video (container count, before trimming to the task)
MAX_INPUT_DURATION_S: Final = 600.0  # one input video's duration from its container header (seconds)
