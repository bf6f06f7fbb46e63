"""Writing and reading generated videos: H.264 MP4 via imageio-ffmpeg's bundled ffmpeg, PNG for one frame.

Every output is written to a hidden temporary name in the target directory and renamed into place,
so a crash or a cancelled task never leaves a half-written file under the final name.

Inside `staged_outputs()` (the worker, see worker.tasks.runner) a finished file is not renamed: it stays under
its attempt-unique staged name `.<stem>.<pid>.partial-<nonce><suffix>` and `StagedOutputs.publish` renames it
later, inside the guarded `Complete` write, so that only the attempt that still holds the claim publishes.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import itertools
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import imageio_ffmpeg
import numpy as np

# imageio-ffmpeg's own stderr catcher and header parser (stable since 0.4): InputVideoReader reports the same
# `meta` as imageio_ffmpeg.read_frames, which cannot hand the child a descriptor.
from imageio_ffmpeg._parsing import LogCatcher, parse_ffmpeg_header
from PIL import Image

MP4_CRF = 17  # visually lossless H.264; the default (quality 5) is visibly blocky on small videos
# x264 preset: at CRF 17 "veryfast" encodes 66 frames of 832x480 3.6-4.7x faster than x264's default
# "medium" at the same quality (PSNR 30.30 vs 30.38 dB on noisy synthetic frames, a smaller file);
# WAN_MP4_PRESET picks another (docs/BENCHMARKS.md, "MP4 encode").
MP4_PRESET = "veryfast"
MP4_PRESET_ENV = "WAN_MP4_PRESET"
X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")
MP4_PIX_FMT = "yuv420p"  # what every player decodes
_PARTIAL_MARK = ".partial"
# Input options for every ffmpeg read: only local files, so a playlist / concat list that slipped
# through cannot make ffmpeg fetch URLs (http, tcp, data ...).
FFMPEG_INPUT_PARAMS: tuple[str, ...] = ("-protocol_whitelist", "file")
_FRAME_LINE = re.compile(rb"frame=\s*(\d+)")


@dataclass(frozen=True)
class VideoInfo:
    """What a written video holds."""

    frames: int
    width: int
    height: int
    fps: float


def to_uint8(frame: np.ndarray) -> np.ndarray:
    """One (H, W, 3) frame as uint8: floats are taken in [0, 1] and clipped."""
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"a frame must have shape (H, W, 3), got {frame.shape}")
    if frame.dtype == np.uint8:
        return frame
    if np.issubdtype(frame.dtype, np.floating):
        return (np.clip(frame, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {frame.dtype}")


def partial_path_for(path: Path) -> Path:
    """The temporary name `path` is written under: `.<stem>.<pid>.partial<suffix>`, same directory."""
    return path.with_name(f".{path.stem}.{os.getpid()}{_PARTIAL_MARK}{path.suffix}")


def partial_files_for(stem: str, directory: Path) -> list[Path]:
    """Leftover temporary files of output `stem` in `directory` (from any process): `.<stem>.<pid>.partial<sfx>`,
    staged files `.<stem>.<pid>.partial-<nonce><sfx>` and the temporary files of a write to a staged name."""
    escaped = glob.escape(stem)
    patterns = [f".{escaped}.*{_PARTIAL_MARK}*", f"..{escaped}.*{_PARTIAL_MARK}*"]
    found = {p for pattern in patterns for p in glob.glob(os.path.join(glob.escape(str(directory)), pattern))}
    # Exact shapes only: another output's stem may start with this one ("a.1" vs "a").
    mark = re.escape(_PARTIAL_MARK)
    own = rf"{re.escape(stem)}\.\d+{mark}"
    exact = re.compile(rf"^(\.{own}(-[0-9a-f]+)?|\.\.{own}-[0-9a-f]+\.\d+{mark})(\.[^.]+)?$")
    return sorted(Path(p) for p in found if exact.match(Path(p).name))


def remove_partial_files(stem: str, directory: Path) -> list[Path]:
    """Delete leftover temporary files of output `stem` (e.g. after a crash); return what was removed."""
    removed = []
    for path in partial_files_for(stem, directory):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def _frames_iter(frames: np.ndarray | Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4:
            raise ValueError(f"frames must have shape (F, H, W, 3), got {frames.shape}")
        return iter(frames)
    return iter(frames)


def _write_png(frame: np.ndarray, tmp: Path) -> None:
    Image.fromarray(to_uint8(frame)).save(tmp, format="PNG")


# Free space under which a broken ffmpeg pipe is read as a full disk: imageio-ffmpeg does not capture ffmpeg's
# stderr ("No space left on device"), so the pipe error alone cannot say why ffmpeg stopped.
DISK_FULL_FREE_BYTES = 16 * 2**20


class OutputDiskFull(RuntimeError):
    """The disk holding the outputs dir filled up while a video was written (retried: space may be freed)."""


def _size(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB"):
        n /= 1024
        if n < 1024:
            return f"{n:.1f} {unit}"
    return f"{n / 1024:.1f} GiB"


def disk_full_error(exc: BaseException, tmp: Path, frames: int, width: int, height: int) -> OutputDiskFull | None:
    """`exc` (raised writing `tmp`) as an `OutputDiskFull` naming the free space and what the video needed,
    or None when the disk is not why it failed. ENOSPC is recognised by errno, by ffmpeg's message, or (a
    broken pipe: ffmpeg died) by the directory having next to no free space left."""
    directory = tmp.parent
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        free = None
    text = str(exc)
    by_errno = isinstance(exc, OSError) and exc.errno == errno.ENOSPC
    by_pipe = isinstance(exc, OSError) and free is not None and free < DISK_FULL_FREE_BYTES
    if not (by_errno or "No space left on device" in text or by_pipe):
        return None
    try:
        written = f"; the partial file had reached {_size(tmp.stat().st_size)}"
    except OSError:
        written = ""
    raw = _size(frames * width * height * 3)
    return OutputDiskFull(
        f"the disk holding the outputs dir {directory} is full ({_size(free) if free is not None else 'unknown'} "
        f"free) while writing {tmp.name}: the video needs more than that ({frames} frame(s) of {width}x{height} "
        f"so far, {raw} as raw RGB{written}); free space there or point --outputs-dir at a larger disk"
    )


def mp4_encoding(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The H.264 settings every MP4 is written with (recorded in result_data as `video_encoding`)."""
    env = os.environ if environ is None else environ
    preset = env.get(MP4_PRESET_ENV, "").strip().lower() or MP4_PRESET
    if preset not in X264_PRESETS:
        raise ValueError(f"{MP4_PRESET_ENV}={preset!r} is not an x264 preset; allowed: {', '.join(X264_PRESETS)}")
    return {"codec": "libx264", "crf": MP4_CRF, "preset": preset, "pix_fmt": MP4_PIX_FMT, "movflags": "+faststart"}


def mp4_output_params(encoding: dict[str, Any]) -> list[str]:
    """ffmpeg output arguments (besides codec and pixel format) for `encoding`."""
    return ["-crf", str(encoding["crf"]), "-preset", str(encoding["preset"]), "-movflags", str(encoding["movflags"])]


def _spawn_kwargs() -> dict[str, Any]:
    """Popen arguments that put ffmpeg in its own process group (a Ctrl-C meant for the worker must not kill a
    write the worker is finishing) without `preexec_fn`.

    imageio-ffmpeg uses `preexec_fn=os.setpgrp`, which makes Python fork() instead of vfork(); since Linux 5.8
    a fork copies every DMA-pinned page of the parent, so in a worker holding pinned host memory (the model
    cache's slabs) each spawn took ~1.5 s per 4 GB pinned, with the GPU idle (measured on the H200 queue).
    `process_group=0` (Python 3.11+) sets the group in the child and keeps the vfork path.
    """
    if os.name != "posix":
        return {}
    if sys.version_info >= (3, 11):
        return {"process_group": 0}
    return {"preexec_fn": os.setpgrp}  # Python 3.10: the fork cost remains


def _write_mp4(frames: Iterator[np.ndarray], first: np.ndarray, tmp: Path, fps: int) -> None:
    height, width = first.shape[:2]
    if width % 2 or height % 2:
        # yuv420p halves chroma resolution: odd sizes would need resizing, which we never do silently.
        raise ValueError(f"MP4 output needs an even width and height, got {width}x{height}")
    encoding = mp4_encoding()
    # The command imageio_ffmpeg.write_frames builds for these settings (raw rgb24 on stdin, no resizing),
    # spawned by us so that it needs no fork (`_spawn_kwargs`) and its exit status is ours to check.
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo"]
    cmd += ["-s", f"{width}x{height}", "-pix_fmt", "rgb24", "-r", f"{fps:.02f}", "-i", "-", "-an"]
    cmd += ["-vcodec", encoding["codec"], "-pix_fmt", encoding["pix_fmt"], *mp4_output_params(encoding)]
    cmd += ["-v", "error", str(tmp)]
    sent = 0
    with tempfile.TemporaryFile() as log:  # ffmpeg's messages: a file never fills up and stalls it like a pipe
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log, **_spawn_kwargs())
        assert proc.stdin is not None
        finished = broken = False
        try:
            try:
                for frame in itertools.chain([first], frames):
                    frame = to_uint8(frame)
                    if frame.shape[:2] != (height, width):
                        got = f"{frame.shape[1]}x{frame.shape[0]}"
                        raise ValueError(f"all frames must be {width}x{height}, got {got}")
                    sent += 1  # counted before sending: a failed send had the disk take that frame too
                    try:
                        proc.stdin.write(np.ascontiguousarray(frame).tobytes())
                    except BrokenPipeError:
                        broken = True
                        break  # ffmpeg exited: its exit status and messages say why (below)
                with contextlib.suppress(BrokenPipeError):
                    proc.stdin.close()
                proc.wait()
                finished = True
            finally:
                if not finished:  # an error, a cancel between frames: stop ffmpeg, the caller removes the file
                    proc.kill()
                    proc.wait()
                if not proc.stdin.closed:
                    with contextlib.suppress(OSError):
                        proc.stdin.close()
            if proc.returncode or broken:
                log.seek(0)
                messages = log.read()[-500:].decode(errors="replace").strip()
                raise OSError(f"ffmpeg failed writing {tmp} (exit code {proc.returncode}): {messages}")
        except OSError as exc:
            # "Broken pipe" and the ffmpeg command line say nothing of a full disk: say that instead.
            full = disk_full_error(exc, tmp, sent, width, height)
            if full is None:
                raise
            raise full from exc


def write_video(
    frames: np.ndarray | Iterable[np.ndarray], path: Path, fps: int, *, staging: StagedOutputs | None = None
) -> Path:
    """Write frames (F, H, W, 3) uint8 or float in [0, 1] to `path`; return the path written.

    One frame is written as a PNG (`path` with suffix `.png`), more as an H.264 MP4 (yuv420p, no
    resizing). The file appears under its final name only once complete. `staging` (default: the
    enclosing `staged_outputs()` block's) keeps the finished file staged instead; a write that runs on
    another thread than the block (the worker's output finisher) passes the block's `StagedOutputs` here.
    """
    path = Path(path)
    iterator = _frames_iter(frames)
    first = next(iterator, None)
    if first is None:
        raise ValueError("write_video needs at least one frame")
    second = next(iterator, None)
    if second is None:
        path = path.with_suffix(".png")
    elif path.suffix.lower() != ".mp4":
        path = path.with_suffix(".mp4")
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = staging if staging is not None else _STAGING.get()
    tmp = staging.path_for(path) if staging is not None else partial_path_for(path)
    try:
        if second is None:
            _write_png(first, tmp)
        else:
            _write_mp4(itertools.chain([second], iterator), np.asarray(first), tmp, fps)
        if staging is not None:
            staging.add(tmp, path)  # published later, by the attempt that still holds the claim
        else:
            os.replace(tmp, path)
    except BaseException:
        # Also on KeyboardInterrupt / a cancel raised by a frame source: never leave the temp file.
        tmp.unlink(missing_ok=True)
        raise
    return path


@dataclass
class StagedOutputs:
    """Finished outputs of one attempt, held under attempt-unique hidden names until `publish` renames them.

    The nonce makes the staged name unique per attempt even across containers that share the outputs dir
    and reuse pids; no other attempt ever writes it, so publishing renames only this attempt's own file.
    """

    nonce: str = field(default_factory=lambda: secrets.token_hex(6))
    files: list[tuple[Path, Path]] = field(default_factory=list)  # (staged, final)

    def path_for(self, final: Path) -> Path:
        """The staged name of `final`: `.<stem>.<pid>.partial-<nonce><suffix>`, same directory."""
        return final.with_name(f".{final.stem}.{os.getpid()}{_PARTIAL_MARK}-{self.nonce}{final.suffix}")

    def add(self, staged: Path, final: Path) -> None:
        """Record a finished staged file and the name it is to be published under."""
        self.files.append((Path(staged), Path(final)))

    def publish(self) -> None:
        """Rename every staged file to its final name (replacing it: only the claim holder calls this)."""
        for staged, final in self.files:
            os.replace(staged, final)
        self.files.clear()

    def discard(self) -> None:
        """Delete the staged files that were not published (a lost claim, a failure); finals are untouched."""
        for staged, _final in self.files:
            staged.unlink(missing_ok=True)
        self.files.clear()


_STAGING: ContextVar[StagedOutputs | None] = ContextVar("wan_staged_outputs", default=None)


@contextmanager
def staged_outputs(staging: StagedOutputs | None = None) -> Iterator[StagedOutputs]:
    """Within this block `write_video` (and the travel stitch) leave finished files staged in `staging`."""
    staging = staging if staging is not None else StagedOutputs()
    token = _STAGING.set(staging)
    try:
        yield staging
    finally:
        _STAGING.reset(token)


def active_staging() -> StagedOutputs | None:
    """The `StagedOutputs` of the enclosing `staged_outputs()` block, if any."""
    return _STAGING.get()


# ---- inputs opened once (see docs/RELIABILITY.md "Inputs opened once") ----------------------------

# Linux reopens /proc/self/fd/N as the very file behind descriptor N, at offset 0 and whatever its name is
# now; elsewhere /dev/fd/N duplicates the descriptor (a shared offset: rewound before each child).
_CHILD_FD_DIR = "/proc/self/fd" if os.path.isdir("/proc/self/fd") else "/dev/fd"
HEADER_TIMEOUT_S = 10.0  # as imageio_ffmpeg.read_frames: ffmpeg prints the stream header well within this


class NotARegularFile(OSError):
    """An input path that names a FIFO, a directory, a device or a socket: never read (a FIFO would block)."""


def _file_kind(mode: int) -> str:
    kinds = [
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ]
    return next((name for test, name in kinds if test(mode)), "not a regular file")


def descriptor_path(fd: int) -> Path | None:
    """The real path of the file open as `fd` (Linux: /proc/self/fd), or None where the system cannot say."""
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
    if not target.startswith("/"):  # "pipe:[123]", "anon_inode:[...]"
        return None
    return Path(target.removesuffix(" (deleted)"))


class OpenedInput:
    """An input file opened once; every later read (PIL, ffmpeg) goes through this descriptor, never the path.

    A path checked and then opened again by a decoder can be swapped in between (a symlink to a file outside
    the input roots); reading the checked descriptor closes that window. `path` is the file's real path when
    it was opened: it names the file in messages and gives its type (suffix), nothing opens it again.
    Deliberately not os.PathLike: `Path(opened)` raises instead of silently falling back to the name.

    Pickled (a context-parallel group sends the call to its other ranks) it travels as its path and file
    identity: the copy reopens the path without following a symlink, and refuses a file that is not the one
    checked here (another device/inode), when it is first read.
    """

    def __init__(self, path: Path, identity: tuple[int, int], file: BinaryIO | None) -> None:
        self.path = path
        self.identity = identity  # (st_dev, st_ino) of the file opened
        self._file = file  # None: an unpickled copy, opened at first use

    @classmethod
    def open(cls, path: Path | str, *, follow_symlinks: bool = True) -> OpenedInput:
        """Open `path` for reading; raise NotARegularFile for anything but a regular file (OSError if unopenable).

        O_NONBLOCK makes opening a FIFO return at once (it is then refused by fstat) instead of waiting for a
        writer; it is cleared again for the reads. With follow_symlinks=False a final symlink fails (ELOOP).
        """
        nonblock = getattr(os, "O_NONBLOCK", 0)
        flags = os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0)
        if not follow_symlinks:
            flags |= os.O_NOFOLLOW
        fd = os.open(path, flags)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotARegularFile(errno.EINVAL, f"it is {_file_kind(info.st_mode)}, not a regular file")
            if nonblock:
                import fcntl  # POSIX only, like O_NONBLOCK

                fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~nonblock)
            real = descriptor_path(fd) or Path(os.path.abspath(path))
            file = os.fdopen(fd, "rb", buffering=0)  # unbuffered: seek() always moves the descriptor's offset
        except BaseException:
            os.close(fd)
            raise
        return cls(real, (info.st_dev, info.st_ino), file)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def suffix(self) -> str:
        return self.path.suffix

    @property
    def closed(self) -> bool:
        return self._file is not None and self._file.closed

    def _handle(self) -> BinaryIO:
        if self._file is None:
            # An unpickled copy: the same file or nothing (no symlink followed, same device and inode).
            opened = OpenedInput.open(self.path, follow_symlinks=False)
            if opened.identity != self.identity:
                opened.close()
                raise OSError(errno.ESTALE, f"{self.path} is no longer the file that was checked")
            self._file = opened._file
        if self._file.closed:
            raise ValueError(f"{self.path} was already closed")
        return self._file

    def fileno(self) -> int:
        return self._handle().fileno()

    def rewound(self) -> BinaryIO:
        """The open file, at offset 0 (the caller must not close it: `close` does)."""
        file = self._handle()
        file.seek(0)
        return file

    def child_args(self) -> tuple[str, tuple[int, ...]]:
        """ffmpeg's `-i` argument and Popen's `pass_fds` for a child that reads this file through its descriptor.

        The child inherits the descriptor under the same number, so the path names it in the child's own table.
        """
        fd = self.rewound().fileno()
        return f"{_CHILD_FD_DIR}/{fd}", (fd,)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> OpenedInput:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __reduce__(self) -> tuple[Any, ...]:
        return (OpenedInput, (self.path, self.identity, None))

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("pending" if self._file is None else f"fd {self._file.fileno()}")
        return f"OpenedInput({str(self.path)!r}, {state})"


class InputVideoReader:
    """ffmpeg decoding an `OpenedInput` to rgb24 frames on its stdout; the child reads only that descriptor.

    imageio_ffmpeg.read_frames takes a path and closes every other descriptor in its child, hence this reader.
    `meta` (size, fps, duration ...) is parsed from the header as imageio_ffmpeg does, before frames are read.
    Close it (or use `with`) to stop ffmpeg: frames not read are never decoded past the pipe's buffer.
    """

    def __init__(self, source: OpenedInput, input_params: Sequence[str] = ()) -> None:
        target, fds = source.child_args()
        cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", *input_params, "-i", target]
        cmd += ["-pix_fmt", "rgb24", "-vcodec", "rawvideo", "-f", "image2pipe", "-"]
        self.name = source.name
        self._proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=fds
        )
        self._log = LogCatcher(self._proc.stderr)  # drains stderr: a full pipe would stall ffmpeg
        try:
            deadline = time.monotonic() + HEADER_TIMEOUT_S
            while self._log.is_alive() and not self._log.header and time.monotonic() < deadline:
                time.sleep(0.01)
            if not self._log.header:
                raise OSError(f"ffmpeg could not read the header of {self.name}: {self._log.get_text(0.2)[-500:]}")
            try:
                self.meta: dict[str, Any] = parse_ffmpeg_header(self._log.header)
            except (IndexError, ValueError, AttributeError) as exc:
                raise OSError(f"ffmpeg printed no usable video header for {self.name} ({exc})") from exc
        except BaseException:
            self.close()
            raise

    def __iter__(self) -> Iterator[bytes]:
        """The raw rgb24 bytes of each frame, in order."""
        width, height = self.meta["size"]
        size = width * height * 3
        stdout = self._proc.stdout
        assert stdout is not None
        while True:
            raw = stdout.read(size)  # a buffered read: short only at the end of the stream
            if not raw:
                return
            if len(raw) < size:
                raise RuntimeError(f"ffmpeg stopped in the middle of a frame of {self.name}: {self._log.get_text()}")
            yield raw

    def close(self) -> None:
        """Stop ffmpeg (if still running) and release its pipes."""
        self._log.stop_me()
        if self._proc.poll() is None:
            self._proc.kill()  # a reader only: nothing to finish writing
        self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()

    def __enter__(self) -> InputVideoReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def count_video_frames(
    path: Path | OpenedInput, *, at_most: int | None = None, input_params: Iterable[str] = ()
) -> int:
    """Frames of the first video stream, counted from the container's packets without decoding any.

    A stream copy to the null muxer only demuxes, so even a long video is counted in milliseconds
    (decoding 28,800 1080p frames takes minutes). With `at_most`, counting stops there: a caller
    that only needs to know "more than N" never reads past N. Raises RuntimeError if ffmpeg fails.
    An `OpenedInput` is read through its descriptor (the child inherits it), never by its name.
    """
    return _demux(path, at_most, input_params)[0]


def _demux(path: Path | OpenedInput, at_most: int | None, input_params: Iterable[str]) -> tuple[int, bytes]:
    """(frames counted, ffmpeg's stderr, which holds the stream header) of one demux-only ffmpeg run."""
    target, fds = path.child_args() if isinstance(path, OpenedInput) else (str(path), ())
    label = path.path if isinstance(path, OpenedInput) else path
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", *FFMPEG_INPUT_PARAMS, *input_params]
    cmd += ["-i", target, "-map", "0:v:0", "-c", "copy"]
    if at_most is not None:
        cmd += ["-frames:v", str(at_most)]
    done = subprocess.run([*cmd, "-f", "null", "-"], capture_output=True, check=False, pass_fds=fds)
    counts = _FRAME_LINE.findall(done.stderr)
    if done.returncode != 0 or not counts:
        tail = done.stderr.decode(errors="replace")[-500:]
        raise RuntimeError(f"ffmpeg could not count the frames of {label} (exit {done.returncode}): {tail}")
    return int(counts[-1]), done.stderr


def probe_video(source: OpenedInput) -> VideoInfo:
    """Frame count, size and fps of an opened MP4 from one demux-only ffmpeg run through its descriptor.

    For the travel stitch, which checks every clip before encoding: one child per clip, spawned without
    fork (imageio_ffmpeg.read_frames forks, for its setpgrp: in a worker holding pinned host memory each
    fork copies that memory, ~1.5 s per 4 GB), and no decode.
    """
    frames, stderr = _demux(source, None, ())
    try:
        meta = parse_ffmpeg_header(stderr.decode(errors="replace"))
        width, height = meta["size"]
    except (IndexError, ValueError, AttributeError, KeyError, TypeError) as exc:
        raise OSError(f"ffmpeg printed no usable video header for {source.name} ({exc})") from exc
    return VideoInfo(frames=frames, width=int(width), height=int(height), fps=float(meta.get("fps") or 0.0))


def iter_opened_video_frames(source: OpenedInput) -> Iterator[np.ndarray]:
    """Yield the frames of an opened MP4 one at a time as (H, W, 3) uint8 arrays, read through its descriptor.

    Like `iter_video_frames`, but the decoder reads the checked descriptor (never the path) and is spawned
    without fork (`InputVideoReader`; see `probe_video` for why that matters in the worker).
    """
    with InputVideoReader(source, FFMPEG_INPUT_PARAMS) as reader:
        width, height = reader.meta["size"]
        for raw in reader:
            # Copy: frombuffer over bytes is read-only, and callers may blend in place.
            yield np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3).copy()


def read_video_info(path: Path) -> VideoInfo:
    """Frame count, size and fps of an MP4 (frames counted from the container) or a PNG (one frame)."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            return VideoInfo(frames=1, width=image.width, height=image.height, fps=0.0)
    with OpenedInput.open(path) as source:  # read through a descriptor: ffmpeg spawned without fork
        return probe_video(source)


def read_video_frames(path: Path) -> np.ndarray:
    """All frames of an MP4 or PNG as a (F, H, W, 3) uint8 array."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))[None]
    with OpenedInput.open(path) as source, InputVideoReader(source, FFMPEG_INPUT_PARAMS) as reader:
        width, height = reader.meta["size"]
        frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), dtype=np.uint8)


def iter_video_frames(path: Path) -> Iterator[np.ndarray]:
    """Yield the frames of an MP4 (or a one-frame PNG) one at a time as (H, W, 3) uint8 arrays.

    Streaming counterpart of `read_video_frames`: only one decoded frame is held at a time. The
    ffmpeg reader is closed when the generator finishes or is closed early.
    """
    path = Path(path)
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            yield np.asarray(image.convert("RGB"))
        return
    with OpenedInput.open(path) as source:
        yield from iter_opened_video_frames(source)
