"""LoRA key layouts and weight deltas that diffusers' Wan LoRA loader does not take as they are.

diffusers' `WanLoraLoaderMixin` reads three layouts: diffusers/peft names under `transformer.`, the original
Wan names under `diffusion_model.` (ComfyUI, Kijai, lightx2v: `lora_down`/`lora_up` or `lora_A`/`lora_B`,
`alpha`, `diff_b`), and musubi-tuner's `lora_unet_*` (renamed here to the original names: diffusers' musubi
converter needs both attentions in every block). `normalize_lora` brings the other layouts users have to one
of those:

- DiffSynth-Studio: peft adapters saved from its own WanModel, original names without a prefix and with
  peft's adapter name: `blocks.N.self_attn.q.lora_A.default.weight` (or without `.default`);
- original or diffusers names without a prefix, or under `model.diffusion_model.` / `base_model.model.`.

diffusers drops the full weight deltas some LoRAs carry (lightx2v, CausVid, AccVideo): `<module>.diff`
(a delta of the module's weight, e.g. the norms `blocks.N.norm3.diff`, `self_attn.norm_q.diff`),
`<module>.diff_b` (of its bias, where no low-rank pair is there to carry it) and `blocks.N.diff_m` (of the
block's modulation table, `blocks.N.modulation`). `split_weight_deltas` takes them out; `DeltaTable`
applies them as `weight = original + sum(multiplier * delta)` and puts the original back exactly.

Layouts that stay unsupported (LyCORIS LoKr / LoHa, DoRA) are refused with a message naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch

from wan_engine.errors import InvalidRequestError

_ORIGINAL_PREFIX = "diffusion_model."
_DIFFUSERS_PREFIX = "transformer."
# Prefixes stripped before the names are judged (longest first).
_PREFIXES = ("model.diffusion_model.", "base_model.model.", "diffusion_model.", "transformer.", "pipe.dit.", "dit.")
_ORIGINAL_MARKS = (
    ".self_attn.",
    ".cross_attn.",
    ".ffn.0.",
    ".ffn.2.",
    ".modulation",
    ".diff_m",
    "head.head.",
    "text_embedding.",
    "time_embedding.",
    "time_projection.",
    "img_emb.",
)
_DIFFUSERS_MARKS = (".attn1.", ".attn2.", ".ffn.net.", "condition_embedder.", "proj_out.", ".scale_shift_table")
_LYCORIS = {
    "LyCORIS LoKr": (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a"),
    "LyCORIS LoHa": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a"),
    "DoRA": (".dora_scale",),
}
_DELTA_SUFFIXES = (".diff", ".diff_b", ".diff_m")
_PAIR = (".lora_A.", ".lora_B.", ".lora_down.", ".lora_up.")


# musubi-tuner / kohya module names are the original Wan names with "_" for ".": where each dot goes.
_MUSUBI_MODULES = (
    (
        re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)$"),
        r"blocks.\1.\2.\3",
    ),
    (re.compile(r"^blocks_(\d+)_ffn_(\d+)$"), r"blocks.\1.ffn.\2"),
    (re.compile(r"^blocks_(\d+)_(norm3|modulation)$"), r"blocks.\1.\2"),
    (re.compile(r"^(text_embedding|time_embedding|time_projection)_(\d+)$"), r"\1.\2"),
    (re.compile(r"^img_emb_proj_(\d+)$"), r"img_emb.proj.\1"),
    (re.compile(r"^head_head$"), "head.head"),
    (re.compile(r"^patch_embedding$"), "patch_embedding"),
)


def _musubi_to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """musubi's `lora_unet_blocks_0_self_attn_q.lora_down.weight` as `diffusion_model.blocks.0.self_attn.q...`.

    diffusers' own musubi converter expects every block to have both attentions' pairs (a LoRA of the
    self-attention only fails with a KeyError); the original-layout converter takes any subset. None when a
    key is not a Wan module name (left to diffusers as it is).
    """
    out = {}
    for key, value in state.items():
        module, dot, rest = key.removeprefix("lora_unet_").partition(".")
        for pattern, replacement in _MUSUBI_MODULES:
            if pattern.match(module):
                out[f"{_ORIGINAL_PREFIX}{pattern.sub(replacement, module)}{dot}{rest}"] = value
                break
        else:
            return None
    return out


def _strip_prefix(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def normalize_lora(state: dict[str, torch.Tensor], name: str) -> tuple[dict[str, torch.Tensor], str]:
    """The LoRA in a layout diffusers' Wan loader reads, and the layout it came in.

    Layout names: "diffusers", "original" (`diffusion_model.`, ComfyUI / Kijai / lightx2v), "musubi",
    "diffsynth", "original-unprefixed", "diffusers-unprefixed", or "unknown" (left as is: the caller
    reports that no layer matched).
    """
    keys = list(state)
    for kind, suffixes in _LYCORIS.items():
        if any(k.endswith(suffixes) for k in keys):
            raise InvalidRequestError(
                f"LoRA {name!r} is a {kind} file ({next(k for k in keys if k.endswith(suffixes))}): not "
                "supported. Convert it to a plain LoRA (lora_A/lora_B or lora_down/lora_up) or use another file."
            )
    if any(k.startswith("lora_unet_") for k in keys):
        converted = _musubi_to_original(state)
        return (converted, "musubi") if converted is not None else (state, "musubi")
    diffsynth = any(".default." in k for k in keys)
    renamed = {}
    for key, value in state.items():
        for part in (".lora_A", ".lora_B", ".lora_down", ".lora_up"):
            key = key.replace(f"{part}.default.", f"{part}.")
            # `.lora.A.weight` / `.lora.down.weight`: the dotted spelling Wan2GP's loader (mmgp) also reads.
            key = key.replace(part.replace("_", ".", 1) + ".", part + ".")
        renamed[key] = value
    bare = {_strip_prefix(k): v for k, v in renamed.items()}
    original = any(m in k for k in bare for m in _ORIGINAL_MARKS)
    diffusers_names = any(m in k for k in bare for m in _DIFFUSERS_MARKS)
    if original == diffusers_names:
        return state, "unknown"  # neither (another model family) or both (a mix the loader reports)
    prefix = _ORIGINAL_PREFIX if original else _DIFFUSERS_PREFIX
    had_prefix = all(k.startswith(prefix) for k in renamed)
    if diffsynth:
        layout = "diffsynth"
    elif had_prefix:
        layout = "original" if original else "diffusers"
    else:
        layout = ("original" if original else "diffusers") + "-unprefixed"
    return {prefix + k: v for k, v in bare.items()}, layout


def _to_diffusers_param(bare: str) -> str:
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return str(next(iter(convert_wan_transformer_to_diffusers({bare: bare}))))


def split_weight_deltas(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(what diffusers' loader takes, {diffusers parameter name: delta}) of a normalized LoRA state dict.

    `X.diff` -> `X.weight` (`X` itself for the modulation table), `X.diff_b` -> `X.bias` when `X` has no
    low-rank pair in the file (else diffusers applies it as `lora_B.bias`), `X.diff_m` -> `X.modulation`.
    """
    modules_with_pairs = set()
    for key in state:
        for mark in _PAIR:
            if mark in key:
                modules_with_pairs.add(key.split(mark)[0])
    rest: dict[str, torch.Tensor] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        suffix = next((s for s in _DELTA_SUFFIXES if key.endswith(s)), None)
        if suffix is None or (suffix == ".diff_b" and key[: -len(suffix)] in modules_with_pairs):
            rest[key] = value
            continue
        module = key[: -len(suffix)]
        original = module.startswith(_ORIGINAL_PREFIX)
        bare = _strip_prefix(module)
        if suffix == ".diff_m":
            target = bare if bare.endswith("modulation") else f"{bare}.modulation" if bare else "modulation"
        elif bare.endswith(("modulation", "scale_shift_table")):
            target = bare  # a bare parameter, not a module with a weight
        else:
            target = f"{bare}.{'bias' if suffix == '.diff_b' else 'weight'}"
        deltas[_to_diffusers_param(target) if original else target] = value
    return rest, deltas


def has_lora_pairs(state: dict[str, torch.Tensor]) -> bool:
    """True when low-rank weights remain for diffusers' loader (not only alphas or nothing)."""
    return any(mark in key for key in state for mark in _PAIR) or any(k.startswith("lora_unet_") for k in state)


@dataclass
class _Entry:
    param: torch.Tensor
    original: torch.Tensor  # a CPU copy of the weight before any delta
    deltas: dict[str, torch.Tensor] = field(default_factory=dict)  # adapter -> delta (CPU)


def _parameter(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """A parameter by diffusers name, also when peft wrapped its layer (`.base_layer.`)."""
    parent, _, leaf = name.rpartition(".")
    for candidate in (name, f"{parent}.base_layer.{leaf}" if parent else name):
        try:
            return module.get_parameter(candidate)
        except AttributeError:
            continue
    return None


class DeltaTable:
    """Full weight deltas applied to one transformer: `original + sum(weight * delta)`, restored exactly."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.entries: dict[str, _Entry] = {}
        self.weights: dict[str, float] = {}  # adapter -> multiplier now applied

    def add(self, adapter: str, deltas: dict[str, torch.Tensor], lora: str) -> int:
        """Register one LoRA's deltas (checked against the weights' shapes), applied at weight 1.0 like a
        freshly loaded peft adapter until `set_weights` says otherwise."""
        found: list[tuple[str, torch.Tensor, torch.Tensor]] = []
        for name, delta in deltas.items():
            param = _parameter(self.module, name)
            if param is None:
                raise InvalidRequestError(
                    f"LoRA {lora!r} has a weight delta for {name!r}, which this model does not have: it was made "
                    "for another model family."
                )
            if tuple(delta.shape) != tuple(param.shape):
                raise InvalidRequestError(
                    f"LoRA {lora!r}: the delta for {name!r} has shape {list(delta.shape)}, the model's weight "
                    f"{list(param.shape)}: it was made for another model size."
                )
            found.append((name, param, delta))
        for name, param, delta in found:
            entry = self.entries.get(name)
            if entry is None:
                entry = self.entries[name] = _Entry(param, param.detach().to("cpu", copy=True))
            entry.deltas[adapter] = delta.detach().to("cpu", torch.float32)
        self.set_weights({adapter: 1.0})
        return len(found)

    @torch.no_grad()
    def set_weights(self, weights: dict[str, float]) -> None:
        """Set the multipliers of `weights`' adapters; every delta-carrying weight becomes
        `original + sum(multiplier * delta)` (in float32, then cast once to the weight's dtype)."""
        if all(self.weights.get(a) == w for a, w in weights.items()):
            return
        self.weights.update(weights)
        for entry in self.entries.values():
            total = entry.original.float()
            for adapter, delta in entry.deltas.items():
                weight = self.weights.get(adapter, 0.0)
                if weight:
                    total = total + weight * delta
            entry.param.data.copy_(total.to(entry.param.dtype))

    @torch.no_grad()
    def restore(self) -> None:
        """Put every original weight back, bit for bit, and forget the deltas."""
        for entry in self.entries.values():
            entry.param.data.copy_(entry.original)
        self.entries.clear()
        self.weights.clear()

    def __len__(self) -> int:
        return len(self.entries)


def describe_keys(state: dict[str, Any]) -> str:
    """A short hint at a file's key layout for error messages: its first key."""
    first = next(iter(sorted(state)), None)
    return f"first key {first!r}" if first else "no tensors"
