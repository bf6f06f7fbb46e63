"""VRAM estimates per memory profile, the GPU of this machine, and the per-preset readiness report.

Nothing is loaded: parameter counts come from the safetensors headers (or, for a component whose
weights are absent, from its config instantiated on the meta device). The formula (bytes):

    W_c  = params_c x dtype bytes            weights of component c (bf16: 2; the VAE: 4 in float32, its
                                             default, 2 under WAN_VAE_PRECISION=16 / bf16)
    B_c  = largest top-level block of c      (`blocks.N`, `vace_blocks.N`: what diffusers' block-level group
                                             offloading moves one by one; nested lists move as one group)
    NB_c = W_c - all blocks of c             (embeddings, heads, norms, nested lists: resident while c runs)
    T_c  = largest single tensor of c        (a leaf module's weight)
    A_c  = activation peak of c at the given resolution and frames (below)

    gpu            = sum_c W_c + max_c A_c   everything resident
    model_offload  = max_c (W_c + A_c)       one component on the GPU at a time (each Wan 2.2 expert is one)
    group_offload  = max_c (NB_c + 2 B_c + A_c)   block-level groups, the next one prefetched on a stream
    sequential     = max_c (T_c + A_c)       one leaf module at a time (the VAE: W_vae + A_vae, kept whole)
    cpu            = 0

Activations (batch 1: the diffusers Wan pipelines run the conditional and unconditional passes one
after the other). With a VAE of spatial factor s, temporal factor t and patch p, and a transformer
patch (pt, ph, pw), a video of F frames at W x H has L = (1 + (F-1)/t)/pt x (H/s/ph) x (W/s/pw) tokens:

    A_transformer   = L x (6 dim + 2 ffn_dim) x 2 B     residual stream, norm, q, k, v, attention output,
                                                        FFN hidden + GELU (bf16)
                      + heads x L^2 x 2 x 2 B           only with attention="math" (scores + softmax);
                                                        SDPA flash / memory-efficient kernels are linear in L
    A_text_encoder  = 512 x (8 d_model + 3 d_ff) x 4 B + heads x 512^2 x 3 x 4 B
    A_image_encoder = 257 x (6 hidden + 2 intermediate) x 4 B
    A_vae           = k x t x (H/p)(W/p) x C x v B + F x 3 x H x W x v B
                      (one latent frame = t video frames decoded at a time, C = (decoder_)base_dim x
                      dim_mult[0] channels at the last stage, k = 15 for the Wan 2.1 VAE, 24 for the
                      residual Wan 2.2 VAE; plus the decoded video; v = the VAE's bytes per element, 4
                      in float32 where k was fitted; a 16-bit VAE's feature maps and output are 16-bit)

The constants were fitted on an H100 (diffusers 0.42.1, torch SDPA, random weights): measured vs
estimated activation peaks, GiB -- transformer 1.3B 832x480x81 1.54 / 1.65, 14B 832x480x81 3.48 / 3.56,
14B 1280x720x81 8.02 / 8.22, TI2V-5B 1280x704x121 2.15 / 2.39; Wan 2.1 VAE 832x480 at 17 / 81 / 121
frames 8.47 / 8.76 / 8.95 vs 8.64 / 8.93 / 9.11, 1280x720x81 20.21 / 20.61; Wan 2.2 VAE 832x480x81
9.17 / 9.50, 1280x704x121 21.06 / 21.84. Whole Wan 2.1 1.3B pipeline (UMT5-XXL, CFG, 832x480x81, one
step + decode), peak allocated: gpu 22.56 / 22.63, model_offload 10.86 / 10.89, group_offload (diffusers
`enable_group_offload`, block level) 10.86 / 10.89. Weights are exact (headers). Estimates choose a
memory profile; they are not accurate to the megabyte, and VAE tiling (not counted) would lower A_vae.
`fits` adds the CUDA context and allocator slack.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from wan_engine.checkpoint_formats import transformer_files
from wan_engine.model_checks import SafetensorsError, read_safetensors_header, weightless_files
from wan_engine.model_sources import ModelCheck, check_model, summary
from wan_engine.presets import Preset
from wan_engine.vae_precision import vae_element_bytes

log = logging.getLogger(__name__)

PROFILES = ("gpu", "model_offload", "group_offload", "sequential", "cpu")
Attention = Literal["sdpa", "math"]
GIB = 1024**3
CUDA_CONTEXT_BYTES = int(0.6 * GIB)  # context + cuBLAS workspaces, never counted by the allocator
ALLOCATOR_SLACK = 1.10  # fragmentation of the caching allocator
TEXT_TOKENS = 512  # Wan's max_sequence_length
# Full-resolution feature maps alive at once while the VAE decodes one latent frame (measured, see above).
VAE_COPIES, VAE_COPIES_RESIDUAL = 15, 24
VAE_TILE = 256  # diffusers' AutoencoderKLWan tile_sample_min_height/width: one tile's feature maps at a time
CLIP_TOKENS = 257  # CLIP ViT-H/14 at 224 px: 16 x 16 patches + class token
# Top-level ModuleList children (`blocks.N`, `vace_blocks.N`), the ComfyUI prefix aside: diffusers'
# block-level group offloading moves these one by one and everything else (nested lists such as the
# UMT5 encoder's `encoder.block.N` or the VAE's) as one group.
_BLOCK = re.compile(r"^(?:model\.diffusion_model\.)?([A-Za-z_]*blocks\.\d+)\.")


@dataclass(frozen=True)
class ComponentSize:
    """Parameter bytes of one pipeline component at the dtype it runs in, and how they split."""

    name: str
    params: int
    weight_bytes: int
    largest_block_bytes: int
    blocks_bytes: int
    largest_tensor_bytes: int
    activation_bytes: int
    counted_from: Literal["safetensors", "config"]

    @property
    def non_block_bytes(self) -> int:
        """Weights outside the repeated blocks (resident whenever the component runs)."""
        return self.weight_bytes - self.blocks_bytes


@dataclass(frozen=True)
class VramEstimate:
    """Estimated peak VRAM (bytes) of one generation under each memory profile."""

    width: int
    height: int
    frames: int
    attention: Attention
    tokens: int
    components: tuple[ComponentSize, ...]
    profiles: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (GiB rounded to 0.01)."""
        return {
            "resolution": f"{self.width}x{self.height}",
            "frames": self.frames,
            "attention": self.attention,
            "tokens": self.tokens,
            "profiles_gb": {name: round(value / GIB, 2) for name, value in self.profiles.items()},
            "components": {
                c.name: {
                    "params": c.params,
                    "weights_gb": round(c.weight_bytes / GIB, 3),
                    "activations_gb": round(c.activation_bytes / GIB, 3),
                    "counted_from": c.counted_from,
                }
                for c in self.components
            },
        }


@dataclass(frozen=True)
class GpuInfo:
    """The GPU this process would use."""

    name: str
    total_bytes: int
    free_bytes: int | None

    def fits(self, estimate_bytes: int) -> bool:
        """True when an estimate fits in this GPU's memory, with context and allocator slack."""
        return estimate_bytes * ALLOCATOR_SLACK + CUDA_CONTEXT_BYTES <= self.total_bytes


def nvml_index(environ: Mapping[str, str] | None = None) -> int:
    """NVML's index of the GPU this process uses: NVML numbers every GPU on the machine and ignores
    CUDA_VISIBLE_DEVICES, so `CUDA_VISIBLE_DEVICES=3` (a `--gpus` child) is NVML device 3. 0 otherwise."""
    env = os.environ if environ is None else environ
    first = env.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(first) if first.isdigit() else 0


def detect_gpu() -> GpuInfo | None:
    """The first GPU (pynvml when installed, else torch.cuda); None on a machine without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(nvml_index())
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        name = pynvml.nvmlDeviceGetName(handle)
        return GpuInfo(name.decode() if isinstance(name, bytes) else str(name), int(memory.total), int(memory.free))
    except Exception:  # not installed, no driver, no device: fall back to torch
        pass
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info(0)
        return GpuInfo(torch.cuda.get_device_name(0), int(total), int(free))
    except Exception:
        return None


# ---- parameter counts ------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _shapes_from_headers(files: list[Path]) -> dict[str, tuple[int, ...]] | None:
    shapes: dict[str, tuple[int, ...]] = {}
    try:
        for path in files:
            shapes.update({name: t.shape for name, t in read_safetensors_header(path).tensors.items()})
    except SafetensorsError:
        return None
    return shapes or None


def _shapes_from_config(folder: Path, library: str, class_name: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of a component built from its config on the meta device (no memory, no weights)."""
    try:
        import importlib

        import torch

        cls = getattr(importlib.import_module(library), class_name)
        with torch.device("meta"):
            if library == "transformers":
                from transformers import AutoConfig

                model = cls(AutoConfig.from_pretrained(folder, local_files_only=True))
            else:
                model = cls.from_config(cls.load_config(folder, local_files_only=True))
        # Parameters, not the state dict: tied weights (UMT5's shared embedding) count once, as saved.
        return {name: tuple(t.shape) for name, t in model.named_parameters()}
    except Exception as exc:  # unknown class, unreadable config: no estimate for this component
        log.debug("no meta model for %s: %s", folder, exc)
        return None


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def _size(name: str, shapes: dict[str, tuple[int, ...]], element_bytes: int, activation: int, source: Any) -> Any:
    blocks: dict[str, int] = {}
    for tensor, shape in shapes.items():
        match = _BLOCK.match(tensor)
        if match:
            blocks[match[1]] = blocks.get(match[1], 0) + _numel(shape)
    params = sum(_numel(s) for s in shapes.values())
    return ComponentSize(
        name=name,
        params=params,
        weight_bytes=params * element_bytes,
        largest_block_bytes=max(blocks.values(), default=0) * element_bytes,
        blocks_bytes=sum(blocks.values()) * element_bytes,
        largest_tensor_bytes=max((_numel(s) for s in shapes.values()), default=0) * element_bytes,
        activation_bytes=activation,
        counted_from=source,
    )


# ---- activations ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Geometry:
    width: int
    height: int
    frames: int
    attention: Attention
    vae: dict[str, Any] = field(default_factory=dict)
    tiled_vae: bool = False  # the decode runs in tiles of VAE_TILE pixels (memory_profiles.tile_vae)
    vae_bytes: int = 4  # bytes per element of the VAE's weights and feature maps (WAN_VAE_PRECISION)

    @property
    def spatial(self) -> int:
        default = 2 ** len(self.vae.get("temperal_downsample", [0, 0, 0]))
        return int(self.vae.get("scale_factor_spatial") or default)

    @property
    def temporal(self) -> int:
        default = 2 ** sum(bool(x) for x in self.vae.get("temperal_downsample", [False, True, True]))
        return int(self.vae.get("scale_factor_temporal") or default)

    def tokens(self, patch: tuple[int, int, int]) -> int:
        latent_frames = 1 + (self.frames - 1) // self.temporal
        h, w = self.height // self.spatial, self.width // self.spatial
        return max(1, latent_frames // patch[0]) * max(1, h // patch[1]) * max(1, w // patch[2])


def _activation_bytes(name: str, config: dict[str, Any], geo: _Geometry) -> int:
    """Peak activation bytes of one component (see the module docstring for the formula)."""
    if name.startswith("transformer"):
        heads = int(config.get("num_attention_heads", 0))
        dim = heads * int(config.get("attention_head_dim", 0))
        tokens = geo.tokens(tuple(config.get("patch_size", (1, 2, 2))))  # type: ignore[arg-type]
        total = tokens * (6 * dim + 2 * int(config.get("ffn_dim", 0))) * 2
        if geo.attention == "math":
            total += heads * tokens * tokens * 2 * 2
        return total
    if name == "text_encoder":
        d_model, d_ff, heads = (int(config.get(k, 0)) for k in ("d_model", "d_ff", "num_heads"))
        # Scores, scores + relative position bias, softmax: three float32 [heads, 512, 512] tensors.
        return TEXT_TOKENS * (8 * d_model + 3 * d_ff) * 4 + heads * TEXT_TOKENS**2 * 3 * 4
    if name == "image_encoder":
        hidden, inter = int(config.get("hidden_size", 0)), int(config.get("intermediate_size", 0))
        return CLIP_TOKENS * (6 * hidden + 2 * inter) * 4
    if name == "vae":
        patch = int(config.get("patch_size") or 1)
        base_dim = config.get("decoder_base_dim") or config.get("base_dim", 96)
        channels = int(base_dim) * int((config.get("dim_mult") or [1])[0])
        height, width = (min(side, VAE_TILE) if geo.tiled_vae else side for side in (geo.height, geo.width))
        pixels = (height // patch) * (width // patch)
        copies = VAE_COPIES_RESIDUAL if config.get("is_residual") else VAE_COPIES
        video = geo.frames * 3 * geo.height * geo.width
        return (copies * geo.temporal * pixels * channels + video) * geo.vae_bytes
    return 0


def vae_decode_bytes(
    vae_config: Mapping[str, Any], width: int, height: int, frames: int, *, element_bytes: int, tiled: bool = False
) -> int:
    """A_vae above: the activation peak of one decode of a `width` x `height` x `frames` video by a VAE of this
    config, in a dtype of `element_bytes` (tiled: one tile's feature maps)."""
    config = dict(vae_config)
    geo = _Geometry(width, height, frames, "sdpa", config, tiled, element_bytes)
    return _activation_bytes("vae", config, geo)


# ---- the estimate --------------------------------------------------------------------------------


def _component_files(check: ModelCheck, folder: Path, name: str) -> list[Path]:
    if name == "transformer" and check.single_file is not None:
        return transformer_files(check.single_file)  # a file, or an original Wan folder's shards
    if name == "transformer_2" and check.single_file_2 is not None:
        return transformer_files(check.single_file_2)
    if name == "transformer_2" and check.path2 is not None:
        return sorted(_config_dir(check, folder, name).glob("*.safetensors"))
    return sorted((folder / name).glob("*.safetensors"))


def _config_dir(check: ModelCheck, folder: Path, name: str) -> Path:
    """Where a component's config lives (an expert named by URLs2 may bring its own)."""
    if name == "transformer_2" and check.path2 is not None:
        has_index = (check.path2 / "model_index.json").is_file()
        return check.path2 / "transformer" if has_index else check.path2
    if name == "transformer_2" and not (folder / name).is_dir():
        return folder / "transformer"
    return folder / name


def _pipeline_folder(check: ModelCheck) -> Path | None:
    """The folder to estimate from: the checked one, else any candidate holding a model_index.json."""
    if check.path is not None:
        return check.path
    return next((c.path for c in check.candidates if (c.path / "model_index.json").is_file()), None)


def _fp8_blocks(size: ComponentSize, dtype_bytes: int) -> ComponentSize:
    """The same component with its repeated blocks stored at one byte per weight."""
    saved = size.blocks_bytes - size.blocks_bytes // dtype_bytes
    return replace(
        size,
        weight_bytes=size.weight_bytes - saved,
        blocks_bytes=size.blocks_bytes // dtype_bytes,
        largest_block_bytes=size.largest_block_bytes // dtype_bytes,
    )


def estimate_vram(
    preset: Preset,
    check: ModelCheck,
    *,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
    attention: Attention = "sdpa",
    dtype_bytes: int = 2,
    fp8: bool = False,
    tiled_vae: bool = False,
    vae_dtype_bytes: int | None = None,
) -> VramEstimate | None:
    """Estimated peak VRAM per profile at the preset's (or the given) resolution and frames.

    `fp8`: the transformers' blocks hold one byte per weight (wan_engine.fp8) instead of `dtype_bytes`.
    `tiled_vae`: the VAE decodes in tiles (its feature maps at one tile's size).
    `vae_dtype_bytes`: bytes per VAE weight and feature-map element (default: WAN_VAE_PRECISION's dtype, as
    `load_pipeline` loads it: 4 for float32, 2 for float16 / bfloat16).

    None when nothing on disk says how big the model is (no pipeline folder found).
    """
    from wan_engine.generation_params import BUILTIN_DEFAULTS

    folder = _pipeline_folder(check)
    if folder is None:
        return None
    defaults = {**BUILTIN_DEFAULTS, **preset.settings.as_params()}
    default_w, default_h = (int(x) for x in str(defaults["resolution"]).split("x"))
    vae_config = _read_json(folder / "vae" / "config.json")
    frames = frames or int(defaults["video_length"])
    if vae_dtype_bytes is None:
        vae_dtype_bytes = vae_element_bytes()
    geo = _Geometry(width or default_w, height or default_h, frames, attention, vae_config, tiled_vae, vae_dtype_bytes)
    index = _read_json(folder / "model_index.json")
    names = [n for n, v in index.items() if not n.startswith("_") and isinstance(v, list) and v and v[0]]
    if check.single_file_2 is not None or check.path2 is not None:
        names = list(dict.fromkeys([*names, "transformer_2"]))
    components = []
    for name in names:
        library, class_name = (index.get(name) or index.get("transformer") or ["diffusers", "?"])[:2]
        if weightless_files(str(class_name)) is not None:
            continue
        config_dir = _config_dir(check, folder, name)
        element_bytes = vae_dtype_bytes if name == "vae" else dtype_bytes
        activation = _activation_bytes(name, _read_json(config_dir / "config.json"), geo)
        shapes = _shapes_from_headers(_component_files(check, folder, name))
        source = "safetensors"
        if shapes is None:
            shapes, source = _shapes_from_config(config_dir, str(library), str(class_name)), "config"
        if shapes is not None:
            size = _size(name, shapes, element_bytes, activation, source)
            components.append(_fp8_blocks(size, dtype_bytes) if fp8 and name.startswith("transformer") else size)
    if not components:
        return None
    transformer = next((c for c in components if c.name == "transformer"), None)
    profiles = {
        "gpu": sum(c.weight_bytes for c in components) + max(c.activation_bytes for c in components),
        "model_offload": max(c.weight_bytes + c.activation_bytes for c in components),
        "group_offload": max(c.non_block_bytes + 2 * c.largest_block_bytes + c.activation_bytes for c in components),
        # The VAE stays whole on the device under this profile (memory_profiles.apply_profile).
        "sequential": max(
            (c.weight_bytes if c.name == "vae" else c.largest_tensor_bytes) + c.activation_bytes for c in components
        ),
        "cpu": 0,
    }
    config = _read_json(folder / "transformer" / "config.json")
    tokens = geo.tokens(tuple(config.get("patch_size", (1, 2, 2)))) if transformer else 0  # type: ignore[arg-type]
    return VramEstimate(geo.width, geo.height, geo.frames, attention, tokens, tuple(components), profiles)


# ---- the report ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelReport:
    """A preset's readiness: present / missing / corrupted, VRAM per profile, and what fits this GPU."""

    preset: Preset
    check: ModelCheck
    vram: VramEstimate | None
    gpu: GpuInfo | None

    @property
    def fits(self) -> dict[str, bool | None]:
        """Per profile: fits this GPU (None: no GPU, or no estimate)."""
        if self.vram is None or self.gpu is None:
            return {name: None for name in PROFILES}
        return {name: name == "cpu" or self.gpu.fits(value) for name, value in self.vram.profiles.items()}

    @property
    def recommended_profile(self) -> str | None:
        """The fastest profile that fits ("cpu" without a GPU); None without an estimate."""
        if self.vram is None:
            return None
        if self.gpu is None:
            return "cpu"
        return next(name for name in PROFILES if self.fits[name])

    def line(self) -> str:
        """One log / table line: status, where or what is wrong, VRAM of the all-resident profile."""
        vram = f"{self.vram.profiles['gpu'] / GIB:.2f} GiB all resident" if self.vram else "VRAM unknown"
        return f"{self.preset.key}: {self.check.status} ({vram}) {summary(self.check)}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form (`wan-worker models --json`)."""
        return {
            **self.check.to_dict(),
            "architecture": self.preset.model.architecture,
            "vram": self.vram.to_dict() if self.vram else None,
            "fits": self.fits,
            "recommended_profile": self.recommended_profile,
            "gpu": self.gpu.name if self.gpu else "no GPU",
        }


def model_report(
    preset: Preset,
    models_dir: Path,
    gpu: GpuInfo | None = None,
    *,
    width: int | None = None,
    height: int | None = None,
    frames: int | None = None,
) -> ModelReport:
    """Check one preset's files and estimate its VRAM (no loading, no network)."""
    check = check_model(preset, models_dir)
    try:
        vram = estimate_vram(preset, check, width=width, height=height, frames=frames)
    except Exception as exc:  # an estimate must never hide the check itself
        log.warning("VRAM estimate of %s failed: %s", preset.key, exc)
        vram = None
    return ModelReport(preset, check, vram, gpu)
