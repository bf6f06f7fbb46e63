"""The lossless speed path on CUDA: the fastest attention kernel (chosen by a probe) and regional compile.

Applied once per loaded model (`pipeline_runtime.load_pipeline`), on CUDA only:

1. **Attention backend.** Wan's self-attention over ~32k tokens (832x480x81) is most of a step's
   arithmetic. The diffusers attention dispatcher offers several exact (non-approximate) kernels;
   which is fastest depends on the GPU and the torch build (on an H100 with torch 2.11, cuDNN runs
   at ~600 TFLOP/s against ~345 for FlashAttention-2, and `native` SDPA already picks cuDNN).
   `probe_attention_backends` times each one on the model's head layout at a representative
   sequence length, checks its output against a float32 reference, and the fastest one within bf16
   noise is set on every transformer (diffusers' default unless another is >3% faster). The result is
   kept in the compile cache folder (`wan_attention_probe.json`, keyed by GPU, torch, cuDNN, diffusers,
   the installed flash-attention modules, heads, head_dim and dtype), so a restarted worker skips it.
2. **Regional torch.compile.** `compile_repeated_blocks` compiles the transformer block once; all
   blocks (and both Wan 2.2 experts, and every later model with the same block shapes) reuse the
   compiled code. The token dimension is compiled dynamic (`WAN_COMPILE_DYNAMIC`, default `mark`:
   marked dynamic from the first compile), so new frame counts, resolutions, travel segment lengths
   and 1-frame tasks reuse the same code instead of compiling per shape. The recompile limit is raised
   so a long-lived worker that sees several models keeps every variant compiled.
3. **On-disk compile caches.** Inductor's FX graph cache, the AOTAutograd cache, the autotune cache and
   dynamo's profile of dynamic dimensions are kept in one folder (`WAN_COMPILE_CACHE_DIR`, default
   `<models dir>/.compile_cache`), so a restarted worker skips the compilation done before; the block
   layouts compiled there are recorded in it (`wan_engine.compile_policy.LAYOUTS_FILE`).
4. **Compile where it pays** (`wan_engine.compile_policy`, via `task_compile`): a task runs compiled
   when compiled code covers its shape or its forwards earn the compile back, else eagerly; LoRA tasks
   run compiled with the LoRAs fused, a schedule re-fused where it changes (`wan_engine.lora_fusion`). The
   decision is recorded in result_data (`speed.compile`).

Both keep the output within bf16 rounding of the plain pipeline (bench/gpu_bench.py measures it).
Switches (environment): `WAN_SPEED=off` disables the whole path; `WAN_ATTENTION_BACKEND` forces a
diffusers backend name instead of the probe; `WAN_COMPILE=off` keeps the attention choice but skips
torch.compile; `WAN_COMPILE_DYNAMIC` = mark | auto | off; `WAN_COMPILE_POLICY` = pays | always;
`WAN_COMPILE_CACHE_DIR` moves the caches (`off` keeps torch's own default folder). The analytic FLOP
count of a Wan transformer forward (`wan_transformer_flops`) is here too: it gives the floor a step can
reach and the MFU the benchmark reports.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from wan_engine.compile_policy import DYNAMIC_MODES, POLICIES, CompileDecision, CompileTracker

log = logging.getLogger(__name__)

SPEED_ENV = "WAN_SPEED"
ATTENTION_ENV = "WAN_ATTENTION_BACKEND"
COMPILE_ENV = "WAN_COMPILE"
DYNAMIC_ENV = "WAN_COMPILE_DYNAMIC"
POLICY_ENV = "WAN_COMPILE_POLICY"
CACHE_ENV = "WAN_COMPILE_CACHE_DIR"
CACHE_FOLDER = ".compile_cache"  # in the models folder unless WAN_COMPILE_CACHE_DIR says otherwise
PROBE_FILE = "wan_attention_probe.json"  # in the compile cache folder: probe results by GPU and head layout
PROBE_FORMAT = 1
PROBE_ENTRIES_KEPT = 32  # bounds the file: GPUs x head layouts x dtypes x versions a folder has seen
KERNEL_MODULES = ("flash_attn", "flash_attn_interface")  # a new one installed makes the old probe foreign
_OFF = {"0", "off", "false", "no", "none"}

# Exact attention kernels only (SageAttention and other quantised kernels are not lossless). Kernels
# whose package is missing fail their probe and are skipped.
CANDIDATE_BACKENDS: tuple[str, ...] = ("_native_cudnn", "_native_flash", "native", "_flash_3", "flash")
PROBE_TOKENS = 32760  # 832x480x81 (21 latent frames x 30 x 52 patches): the common Wan 2.1 task
PROBE_REFERENCE_ROWS = 128  # queries checked against float32 attention (keeps the reference small)
MAX_ATTENTION_REL_ERROR = 1e-2  # bf16 noise; a kernel beyond this is never chosen
DEFAULT_BACKEND = "native"  # diffusers' default: torch SDPA picks the kernel (cuDNN on Hopper with torch 2.11)
DEFAULT_BACKEND_TIE = 1.03  # keep the default unless another kernel is more than 3% faster
RECOMPILE_LIMIT = 64  # compiled variants kept per code object (models x resolutions x CFG batch)


@dataclass(frozen=True)
class SpeedSettings:
    """What the speed path may do. `from_env` reads WAN_SPEED / WAN_ATTENTION_BACKEND / WAN_COMPILE."""

    enabled: bool = True
    attention: str = "auto"  # "auto" probes; otherwise a diffusers attention backend name
    compile: bool = True
    require_cuda: bool = True  # only tests and the CPU dry run of the benchmark turn this off
    dynamic: str = "mark"  # token dimension: "mark" dynamic from the start, "auto" (torch's), "off" static
    cache_dir: str | None = None  # None: <models dir>/.compile_cache; "off": torch's default
    policy: str = "pays"  # compile a task only where it pays ("always": every task)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> SpeedSettings:
        """Settings from the environment (defaults: on, probe the attention kernel, compile)."""
        env = os.environ if environ is None else environ
        enabled = env.get(SPEED_ENV, "on").strip().lower() not in _OFF
        attention = env.get(ATTENTION_ENV, "auto").strip() or "auto"
        compile_blocks = env.get(COMPILE_ENV, "on").strip().lower() not in _OFF
        dynamic = env.get(DYNAMIC_ENV, "mark").strip().lower() or "mark"
        if dynamic in _OFF:
            dynamic = "off"
        if dynamic not in DYNAMIC_MODES:
            raise ValueError(f"{DYNAMIC_ENV}={dynamic!r} is not one of {', '.join(DYNAMIC_MODES)}")
        cache_dir = env.get(CACHE_ENV, "").strip() or None
        policy = env.get(POLICY_ENV, "pays").strip().lower() or "pays"
        if policy not in POLICIES:
            raise ValueError(f"{POLICY_ENV}={policy!r} is not one of {', '.join(POLICIES)}")
        return cls(
            enabled=enabled,
            attention=attention,
            compile=compile_blocks,
            dynamic=dynamic,
            cache_dir=cache_dir,
            policy=policy,
        )


@dataclass(frozen=True)
class BackendProbe:
    """One attention kernel's probe: median seconds per call and error vs float32 (or why it failed)."""

    name: str
    seconds: float | None = None
    rel_error: float | None = None
    error: str | None = None

    @property
    def usable(self) -> bool:
        """True when the kernel ran and stayed within bf16 noise of the reference."""
        return self.error is None and self.rel_error is not None and self.rel_error <= MAX_ATTENTION_REL_ERROR


@dataclass(frozen=True)
class SpeedReport:
    """What the speed path did to one loaded model (kept on LoadedModel, recorded in result_data)."""

    enabled: bool
    reason: str
    attention_backend: str | None = None
    compiled: tuple[str, ...] = ()  # components whose repeated blocks are compiled
    probes: tuple[BackendProbe, ...] = field(default_factory=tuple)
    seconds: float = 0.0  # probe + setup time at load (compilation itself happens at the first step)
    probe_source: str | None = None  # "measured", "cache file" or "this process"; None: no probe ran
    dynamic: str = "off"
    cache_dir: str | None = None
    tracker: CompileTracker | None = field(default=None, compare=False)  # per-task compile decisions

    def brief(self, *, compiled_ran: bool | None = None) -> dict[str, Any]:
        """The part recorded in each task's result_data: the kernel, what ran compiled and why.

        `compiled_ran` overrides the last task's decision (callers from before `task_compile`).
        """
        last = self.tracker.last if self.tracker is not None else None
        ran = compiled_ran if compiled_ran is not None else (last.compiled if last is not None else True)
        return {
            "enabled": self.enabled,
            "attention_backend": self.attention_backend,
            "attention_probe": self.probe_source,
            "compiled": list(self.compiled) if ran else [],
            "compile": {
                "dynamic": self.dynamic,
                "cache_dir": self.cache_dir,
                **(last.to_dict() if last is not None else {}),
            }
            if self.compiled
            else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        data = asdict(self)
        data["compiled"] = list(self.compiled)
        data["probes"] = [asdict(p) for p in self.probes]
        data.pop("tracker", None)
        return data


# ---- attention probe -----------------------------------------------------------------------------


def _attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rows: int) -> torch.Tensor:
    """Exact attention of the first `rows` queries in float32; layout (B, rows, heads, dim)."""
    qf = q[:, :rows].float().transpose(1, 2)
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)
    weights = torch.softmax(qf @ kf.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
    return (weights @ vf).transpose(1, 2)


def _median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median wall time of `fn` after one warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000.0)
        else:
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def probe_attention_backends(
    *,
    heads: int,
    head_dim: int,
    tokens: int = PROBE_TOKENS,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cuda",
    candidates: Sequence[str] = CANDIDATE_BACKENDS,
    repeats: int = 3,
) -> tuple[BackendProbe, ...]:
    """Time each candidate diffusers attention backend on (1, tokens, heads, head_dim) self-attention.

    Every candidate also has its output for the first queries compared with float32 attention; a
    kernel that raises (not built, package missing, wrong device) is recorded with its error.
    """
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    q, k, v = (
        torch.randn(1, tokens, heads, head_dim, generator=generator, device=device, dtype=dtype) for _ in range(3)
    )
    rows = min(PROBE_REFERENCE_ROWS, tokens)
    reference = _attention_reference(q, k, v, rows)
    probes = []
    for name in candidates:
        try:

            def run(name: str = name) -> torch.Tensor:
                return dispatch_attention_fn(q, k, v, backend=name)

            out = run()
            rel = float((out[:, :rows].float() - reference).norm() / reference.norm())
            probes.append(BackendProbe(name, _median_seconds(run, device, repeats), rel))
        except Exception as exc:  # not available here: record why and move on
            probes.append(BackendProbe(name, error=f"{type(exc).__name__}: {str(exc)[:200]}"))
    return tuple(probes)


def choose_backend(probes: Sequence[BackendProbe]) -> str | None:
    """The fastest usable kernel; None when none ran within tolerance.

    diffusers' default (`native`) wins a near-tie: it is what the plain pipeline runs, and a forced
    kernel puts an `sdpa_kernel` switch of torch's global SDPA flags inside every compiled block.
    """
    usable = [p for p in probes if p.usable and p.seconds is not None]
    if not usable:
        return None
    fastest = min(usable, key=lambda p: p.seconds)  # type: ignore[arg-type,return-value]
    default = next((p for p in usable if p.name == DEFAULT_BACKEND), None)
    if default is not None and default.seconds <= fastest.seconds * DEFAULT_BACKEND_TIE:  # type: ignore[operator]
        return default.name
    return fastest.name


_PROBE_CACHE: dict[str, tuple[BackendProbe, ...]] = {}


def _probe_key(heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """What a probe's result depends on; a stored result with another key is foreign (probed again)."""
    import diffusers

    cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cudnn": cudnn,
        "diffusers": diffusers.__version__,
        "kernels": [m for m in KERNEL_MODULES if importlib.util.find_spec(m) is not None],
        "heads": heads,
        "head_dim": head_dim,
        "dtype": str(dtype),
        # On a CPU (tests, dry runs) a short sequence is enough to exercise the probe.
        "tokens": PROBE_TOKENS if cuda else 256,
        "candidates": list(CANDIDATE_BACKENDS),
    }


def _read_probe_entries(folder: Path) -> list[dict[str, Any]]:
    """The probe file's entries; [] when absent, corrupt or another format (then it is rewritten)."""
    path = folder / PROBE_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        log.warning("ignoring the attention probe file %s: %s", path, exc)
        return []
    entries = data.get("entries") if isinstance(data, dict) and data.get("format") == PROBE_FORMAT else None
    return [e for e in entries if isinstance(e, dict)] if isinstance(entries, list) else []


def _probes_from(raw: Any) -> tuple[BackendProbe, ...] | None:
    """Stored probes back as BackendProbe; None when any field is not what a probe writes."""
    if not isinstance(raw, list) or not raw:
        return None
    probes = []
    for item in raw:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        seconds, rel, error = item.get("seconds"), item.get("rel_error"), item.get("error")
        if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (seconds, rel)):
            return None
        if error is not None and not isinstance(error, str):
            return None
        probes.append(BackendProbe(item["name"], seconds, rel, error))
    return tuple(probes)


def _write_probe(folder: Path, key: dict[str, Any], probes: Sequence[BackendProbe]) -> None:
    """Store a probe's result (atomically; other keys' entries kept); a failure only logs."""
    entries = [e for e in _read_probe_entries(folder) if e.get("key") != key]
    entries.append({"key": key, "probes": [asdict(p) for p in probes]})
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=".probe-", suffix=".tmp", dir=folder)
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                json.dump({"format": PROBE_FORMAT, "entries": entries[-PROBE_ENTRIES_KEPT:]}, out, indent=1)
            os.replace(tmp, folder / PROBE_FILE)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as exc:
        log.warning("could not store the attention probe in %s: %s", folder, exc)


def _probe_cached(
    heads: int, head_dim: int, dtype: torch.dtype, device: torch.device, folder: Path | None = None
) -> tuple[tuple[BackendProbe, ...], str]:
    """The probe for this GPU and head layout, and where it came from: "this process" (probed by an
    earlier load), "cache file" (`folder`'s PROBE_FILE, written by an earlier process) or "measured"."""
    key = _probe_key(heads, head_dim, dtype, device)
    memo = json.dumps(key, sort_keys=True)
    if memo in _PROBE_CACHE:
        return _PROBE_CACHE[memo], "this process"
    if folder is not None:
        stored = next((e for e in _read_probe_entries(folder) if e.get("key") == key), None)
        probes = _probes_from(stored.get("probes")) if stored is not None else None
        if probes is not None:
            _PROBE_CACHE[memo] = probes
            return probes, "cache file"
    probes = probe_attention_backends(heads=heads, head_dim=head_dim, tokens=key["tokens"], dtype=dtype, device=device)
    _PROBE_CACHE[memo] = probes
    if folder is not None:
        _write_probe(folder, key, probes)
    return probes, "measured"


# ---- applying the path ---------------------------------------------------------------------------


def transformers_of(pipe: Any) -> list[tuple[str, Any]]:
    """The pipeline's transformers (`transformer`, and the Wan 2.2 low-noise `transformer_2`)."""
    found = []
    for name in ("transformer", "transformer_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            found.append((name, module))
    return found


def _configure_dynamo() -> None:
    import torch._dynamo.config as dynamo_config

    # Every compiled block shares Module._call_impl's code object, so the limit counts all variants
    # (1.3B and 14B blocks, VACE blocks, LoRA-free and 1-frame shapes) together; the default 8 is too
    # few for a long-lived worker, and past it torch silently runs eagerly.
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(int(getattr(dynamo_config, name)), RECOMPILE_LIMIT))
    # Compilation happens lazily inside a task: a compiler failure must cost speed, never the task.
    dynamo_config.suppress_errors = True
    import torch._inductor.config as inductor_config

    # Round where eager rounds (bf16 intermediates inside fused kernels), so the compiled blocks stay
    # within bf16 noise of the plain pipeline instead of drifting through 30-40 layers.
    if hasattr(inductor_config, "emulate_precision_casts"):
        inductor_config.emulate_precision_casts = True


def compile_cache_dir(pipe: Any, settings: SpeedSettings, models_dir: str | Path | None = None) -> Path | None:
    """Where the on-disk compile caches live: WAN_COMPILE_CACHE_DIR, else `<models_dir>/.compile_cache`;
    without a models dir (a script loading one folder), next to the model's folder; None for `off` or
    when neither is known."""
    if settings.cache_dir is not None:
        return None if settings.cache_dir.lower() in _OFF else Path(settings.cache_dir).expanduser()
    if models_dir is not None:
        return Path(models_dir).expanduser().resolve() / CACHE_FOLDER
    source = getattr(pipe, "name_or_path", None) or getattr(getattr(pipe, "config", None), "_name_or_path", None)
    if not source or not Path(str(source)).is_dir():
        return None
    return Path(str(source)).resolve().parent / CACHE_FOLDER


def _torch_default_cache_dir() -> str | None:
    # What inductor puts in TORCHINDUCTOR_CACHE_DIR itself when it first needs a folder (importing
    # diffusers already does): a value equal to this was not chosen by the user.
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except (ImportError, AttributeError):
        return None


def configure_compile_cache(
    folder: Path | None, environ: dict[str, str] | None = None, *, explicit: bool = False
) -> str | None:
    """Turn on torch's on-disk compile caches, in `folder` when given; returns the folder in use.

    Inductor reads TORCHINDUCTOR_CACHE_DIR each time it looks for a cached graph, so this must run
    before the first compile. An `explicit` folder (WAN_COMPILE_CACHE_DIR) always wins; the default one
    (in the models folder) only replaces torch's own default, never a folder the user set: the caches
    are keyed by graph, so one folder serves every model.
    """
    env = os.environ if environ is None else environ
    current = env.get("TORCHINDUCTOR_CACHE_DIR")
    if folder is not None and (explicit or current is None or current == _torch_default_cache_dir()):
        folder.mkdir(parents=True, exist_ok=True)
        env["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
        if explicit or "TRITON_CACHE_DIR" not in env:
            env["TRITON_CACHE_DIR"] = str(folder / "triton")
    import torch._inductor.config as inductor_config

    inductor_config.fx_graph_cache = True  # compiled graphs (Python + kernels) by graph hash
    if hasattr(inductor_config, "autotune_local_cache"):
        inductor_config.autotune_local_cache = True
    try:
        import torch._functorch.config as functorch_config

        functorch_config.enable_autograd_cache = True  # AOTAutograd's cache in front of inductor's
    except (ImportError, AttributeError):
        pass
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "automatic_dynamic_local_pgo"):
        dynamo_config.automatic_dynamic_local_pgo = True  # remembers which dims were dynamic, per code
    return env.get("TORCHINDUCTOR_CACHE_DIR")


def _mark_token_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Mark the token dimension (dim 1 of hidden_states and of every input with as many rows) dynamic."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or hidden.shape[1] <= 1:
        return
    tokens = hidden.shape[1]

    def mark(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.dim() >= 2 and value.shape[1] == tokens:
                torch._dynamo.maybe_mark_dynamic(value, 1)
        elif isinstance(value, (tuple, list)):
            for item in value:
                mark(item)

    for value in (*args, *kwargs.values()):
        mark(value)


def _compile_blocks(module: Any, dynamic: str, backend: Any = "inductor") -> int:
    """Regional compile: every repeated block gets torch.compile of its call (code shared by all).

    Same as diffusers' `compile_repeated_blocks`, plus (dynamic "mark") a thin wrapper that marks the
    token dimension dynamic before each compiled call, so the first compile already covers every shape.
    """
    names = set(getattr(module, "_repeated_blocks", None) or ())
    if not names:
        raise ValueError(f"{type(module).__name__} has no _repeated_blocks")
    # Inference only, and dynamo guards on requires_grad: peft freezes the base weights when a LoRA is
    # loaded, which (left True before) recompiled the first LoRA task and the first plain task after it.
    module.requires_grad_(False)
    count = 0
    for block in module.modules():
        if type(block).__name__ not in names:
            continue
        block.compile(dynamic=False if dynamic == "off" else None, backend=backend)
        if dynamic == "mark":
            inner = block._compiled_call_impl

            def call(*args: Any, _inner: Any = inner, **kwargs: Any) -> Any:
                _mark_token_dims(args, kwargs)
                return _inner(*args, **kwargs)

            block._compiled_call_impl = call
        count += 1
    if count == 0:
        raise ValueError(f"no block of {sorted(names)} found in {type(module).__name__}")
    return count


def _set_backend_locally(transformers: list[tuple[str, Any]], backend: str) -> None:
    """Set `backend` on these transformers only.

    diffusers' `set_attention_backend` also makes it the process-wide default for every model whose
    processors name none; restore that default so other models keep running as plain diffusers does.
    """
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry

        previous = _AttentionBackendRegistry.get_active_backend()[0]
    except (ImportError, AttributeError):  # another diffusers layout: nothing to restore
        previous = None
    for _name, module in transformers:
        module.set_attention_backend(backend)
    if previous is not None:
        _AttentionBackendRegistry.set_active_backend(previous)


def apply_speed_path(
    pipe: Any,
    device: torch.device | str,
    settings: SpeedSettings | None = None,
    *,
    models_dir: str | Path | None = None,
) -> SpeedReport:
    """Set the fastest exact attention kernel and compile the repeated blocks of every transformer.

    A no-op (with the reason in the report) off CUDA, when disabled, or for a pipeline without a
    Wan transformer. Compilation is lazy: it happens during the first denoising step of the first
    task at each new shape, and is reused by every later task. `models_dir`: the worker's models
    folder, whose `.compile_cache` holds the caches unless WAN_COMPILE_CACHE_DIR names another.
    """
    settings = settings or SpeedSettings.from_env()
    device = torch.device(device)
    if not settings.enabled:
        return SpeedReport(False, f"disabled ({SPEED_ENV}=off)")
    if settings.require_cuda and device.type != "cuda":
        return SpeedReport(False, f"not a CUDA device ({device.type})")
    transformers = transformers_of(pipe)
    if not transformers:
        return SpeedReport(False, "no transformer in the pipeline")
    started = time.perf_counter()
    main = transformers[0][1]
    default_folder = compile_cache_dir(pipe, settings, models_dir)
    cache_dir: str | None = None
    if settings.compile:  # before the probe: the probe's result is kept in the same folder
        _configure_dynamo()
        cache_dir = configure_compile_cache(default_folder, explicit=settings.cache_dir is not None)
    probe_folder = Path(cache_dir) if cache_dir is not None else default_folder
    probes: tuple[BackendProbe, ...] = ()
    probe_source: str | None = None
    backend = settings.attention
    if backend == "auto":
        config = main.config
        dtype = main.dtype if device.type == "cuda" else torch.float32  # what the pipeline feeds attention
        heads, head_dim = int(config.num_attention_heads), int(config.attention_head_dim)
        try:
            probes, probe_source = _probe_cached(heads, head_dim, dtype, device, probe_folder)
        except torch.OutOfMemoryError as exc:
            # No room for the probe's tensors (a small GPU or a VRAM cap, with the model resident): keep
            # diffusers' default kernel; the next load probes again.
            torch.cuda.empty_cache()
            probes = (BackendProbe("probe", error=f"OutOfMemoryError: {str(exc).splitlines()[0][:160]}"),)
        backend = choose_backend(probes)  # type: ignore[assignment]
    if backend is not None:
        _set_backend_locally(transformers, backend)
    compiled: list[str] = []
    if settings.compile:
        for name, module in transformers:
            try:
                # Not fullgraph: an unexpected graph break (a new diffusers attention path, say) then
                # costs some speed instead of failing the task. The benchmark counts graphs to check.
                _compile_blocks(module, settings.dynamic)
                compiled.append(name)
            except (ValueError, AttributeError) as exc:  # no `_repeated_blocks` on this class
                log.warning("regional compile skipped for %s: %s", name, exc)
    report = SpeedReport(
        True,
        "cuda" if device.type == "cuda" else f"forced on {device.type}",
        attention_backend=backend,
        compiled=tuple(compiled),
        probes=probes,
        seconds=time.perf_counter() - started,
        probe_source=probe_source,
        dynamic=settings.dynamic if compiled else "off",
        cache_dir=cache_dir,
        tracker=_tracker(settings.dynamic, settings.policy, cache_dir, _toolchain(device)) if compiled else None,
    )
    log.info(
        "speed path: attention=%s (probe %s) compiled=%s (%.2fs)",
        backend,
        probe_source or "not run",
        ",".join(compiled) or "none",
        report.seconds,
    )
    return report


@contextmanager
def eager_blocks(active: bool) -> Iterator[None]:
    """Inside this block, compiled regions run eagerly when `active`.

    Used for tasks the compile would not pay for, and for LoRA tasks whose multipliers change per step:
    peft keeps each adapter's scale as a Python float on the module, which torch.compile would treat
    as a new constant and recompile per step. The attention kernel choice still applies.
    """
    stance = getattr(torch.compiler, "set_stance", None)
    if not active or stance is None:  # torch < 2.6 has no stance: such tasks then recompile as needed
        yield
        return
    with stance("force_eager"):
        yield


_TRACKERS: dict[tuple[str, str], CompileTracker] = {}


def _tracker(dynamic: str, policy: str, cache_dir: str | None, toolchain: str) -> CompileTracker:
    # One per process (the mode and policy come from its environment): compiled block code is shared by
    # every model with the same block layout, so a model loaded after another keeps what was compiled.
    key = (dynamic, policy)
    tracker = _TRACKERS.get(key)
    if tracker is None:
        tracker = _TRACKERS[key] = CompileTracker(
            dynamic=dynamic, policy=policy, disk_cache=cache_dir is not None, cache_dir=cache_dir, toolchain=toolchain
        )
    elif tracker.cache_dir != cache_dir:  # the caches moved (WAN_COMPILE_CACHE_DIR): read that folder's record
        tracker.disk_cache = cache_dir is not None
        tracker.attach(cache_dir)
    return tracker


def _toolchain(device: torch.device) -> str:
    """What compiled code on disk is only valid for: the torch build and the GPU."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"torch {torch.__version__} on {name}"


def block_kinds(transformer: Any) -> int:
    """Distinct repeated block classes of a transformer (a cold compile compiles each)."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    present = {type(m).__name__ for m in transformer.modules()} & names if names else set()
    return max(1, len(present))


def block_layout(transformer: Any) -> str:
    """What identifies a transformer's compiled block code: its class and block shapes."""
    config = transformer.config
    heads, dim = int(config.num_attention_heads), int(config.attention_head_dim)
    return f"{type(transformer).__name__}/{heads}x{dim}/ffn{int(config.ffn_dim)}"


def task_tokens(pipe: Any, width: int, height: int, frames: int) -> int:
    """Transformer tokens of a task (latent frames x patches), from the pipeline's VAE scale factors."""
    spatial = int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8)
    temporal = int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)
    return wan_tokens(width, height, frames, spatial=spatial, temporal=temporal)


@contextmanager
def task_compile(
    report: SpeedReport | None,
    pipe: Any,
    *,
    width: int,
    height: int,
    frames: int,
    steps: int,
    cfg: bool,
    lora_state: Any = None,
    lora_requests: Sequence[Any] = (),
    experts_per_step: Sequence[str] = (),
) -> Iterator[CompileDecision | None]:
    """Run one task's denoising compiled or eagerly, as `wan_engine.compile_policy` decides.

    LoRA tasks run compiled with the LoRAs fused into the weights (restored exactly afterwards); a
    per-step schedule is re-fused where it changes (`wan_engine.lora_fusion`), so nothing recompiles.
    The decision is kept on the report's tracker (`SpeedReport.brief` records it in result_data).
    Yields it; None when nothing is compiled.
    """
    tracker = report.tracker if report is not None else None
    transformers = transformers_of(pipe)
    if tracker is None or not report.compiled or not transformers:  # type: ignore[union-attr]
        with eager_blocks(False):
            yield None
        return
    main = transformers[0][1]
    layout = block_layout(main)
    tokens = task_tokens(pipe, width, height, frames)
    forwards = steps * (2 if cfg else 1)
    with ExitStack() as stack:
        fusion = None
        if lora_requests:
            from wan_engine import lora_fusion

            plan = lora_fusion.fusion_plan(lora_state, lora_requests, experts_per_step)
        flops = wan_transformer_flops(dict(main.config), tokens)
        decision = tracker.decide(layout, tokens, forwards, flops, block_kinds=block_kinds(main))
        if decision.compiled and lora_requests:
            fusion = stack.enter_context(lora_fusion.fused_loras(pipe, plan, lora_state))
            if not fusion.fused:
                decision = tracker.eager(f"eager: {fusion.reason}", layout, tokens, forwards)
            else:
                decision = tracker.last = replace(decision, lora_fused=True, lora_fuse_s=round(fusion.seconds, 3))
        stack.enter_context(eager_blocks(not decision.compiled))
        yield decision
    if fusion is not None and fusion.fused:  # the re-fuses of a schedule happened during the call
        decision = tracker.last = replace(decision, lora_fuse_s=round(fusion.seconds, 3), lora_refuses=fusion.refuses)
    tracker.ran(decision)


# ---- analytic FLOPs ------------------------------------------------------------------------------


def wan_tokens(width: int, height: int, frames: int, *, spatial: int = 8, temporal: int = 4) -> int:
    """Transformer sequence length of a Wan 2.1 video: latent frames x (H/16) x (W/16) with 2x2 patches."""
    latent_frames = 1 + (frames - 1) // temporal
    return latent_frames * (height // spatial // 2) * (width // spatial // 2)


def wan_transformer_flops(config: Mapping[str, Any], tokens: int, text_tokens: int = 512) -> float:
    """FLOPs (2 per multiply-add) of one Wan transformer forward at batch 1: matmuls and attention.

    Per block: self-attention projections (4 d^2 per token), QK^T and PV (2 x 2 L^2 d), cross-attention
    query/output projections (2 d^2 per token) and key/value projections of the text (2 d^2 per text
    token), its scores and PV (2 x 2 L T d), and the feed-forward (2 d ffn per token); plus the patch
    embedding, the output projection and the text embedder. Norms, RoPE, modulation and the
    scheduler are elementwise and left out (they are what a step spends beyond this floor).
    """
    d = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    ffn = int(config["ffn_dim"])
    layers = int(config["num_layers"])
    patch = 1
    for size in config.get("patch_size", (1, 2, 2)):
        patch *= int(size)
    macs_per_block = (
        tokens * 4 * d * d  # self-attention q, k, v, o
        + 2 * tokens * tokens * d  # QK^T and PV
        + tokens * 2 * d * d  # cross-attention q, o
        + text_tokens * 2 * d * d  # cross-attention k, v over the text
        + 2 * tokens * text_tokens * d  # cross-attention scores and PV
        + tokens * 2 * d * ffn  # feed-forward up and down
    )
    text_dim = int(config.get("text_dim", 4096))
    macs_outside = (
        tokens * int(config.get("in_channels", 16)) * patch * d  # patch embedding
        + tokens * d * int(config.get("out_channels", 16)) * patch  # output projection
        + text_tokens * (text_dim * d + d * d)  # text embedder
    )
    return 2.0 * (layers * macs_per_block + macs_outside)
