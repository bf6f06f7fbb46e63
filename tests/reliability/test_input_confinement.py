"""Inputs opened once (issue 18, item 9): a path swapped between the check and the decoder is never followed.

The worker opens each input file once (`worker.tasks.paths.open_input`), checks the open descriptor, and the
decoders read that descriptor: PIL the file object, ffmpeg a descriptor its child inherits. The races are made
deterministic by swapping the path after `open_input` returned (or, for the open itself, from a hook run just
before it). Real files made in tmp_path with the real codecs.
"""

from __future__ import annotations

import os
import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from tests.support.media import noise_image, noise_video
from wan_engine.errors import InvalidRequestError
from wan_engine.generation_inputs import load_image, prepare_i2v_image, prepare_vace_inputs, read_frames
from wan_engine.video_io import InputVideoReader, OpenedInput, count_video_frames
from worker.tasks import paths
from worker.tasks.params import InvalidTaskError
from worker.tasks.paths import close_inputs, open_input, resolve_input_path
from worker.tasks.runner import GenerationRunner


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """inputs/ (the input root), outputs/, and outside/ holding a video and an image the worker must never read."""
    dirs = {name: tmp_path / name for name in ("inputs", "outputs", "outside")}
    for directory in dirs.values():
        directory.mkdir()
    # The secret differs from every input in size and frame count: whatever is decoded says which file it was.
    noise_video(dirs["outside"] / "secret.mp4", 30, width=32, height=32, seed=9)
    noise_image(dirs["outside"] / "secret.png", 32, 32, seed=9)
    return dirs


def _open(layout: dict[str, Path], value: str, key: str = "video_guide") -> OpenedInput:
    return open_input(value, [layout["inputs"]], layout["outputs"], key=key)


def _swap_for_link(path: Path, target: Path) -> None:
    """Replace `path` by a symlink to `target` (what an attacker does between the check and the read)."""
    path.unlink()
    os.symlink(target, path)


# ---- 1: the swap race -------------------------------------------------------------------------------


def test_guide_swapped_for_an_outside_link_after_the_check_reads_the_original(layout: dict[str, Path]) -> None:
    guide = noise_video(layout["inputs"] / "guide.mp4", 12, seed=1)
    expected = read_frames(guide, key="video_guide", limit=12).frames
    with _open(layout, "guide.mp4") as opened:
        _swap_for_link(guide, layout["outside"] / "secret.mp4")
        assert guide.resolve() == (layout["outside"] / "secret.mp4").resolve()  # the path now names the secret
        source = read_frames(opened, key="video_guide", limit=4)  # decodes 5, counts the rest through the fd
        assert (source.width, source.height, source.total_frames) == (80, 60, 12)  # the secret is 32x32, 30 frames
        assert all(np.array_equal(a, b) for a, b in zip(source.frames, expected[:4], strict=True))
        assert count_video_frames(opened) == 12
        inputs = prepare_vace_inputs(opened, None, [], width=80, height=60, num_frames=12)
        assert inputs.notes["video_guide"]["source"].startswith("guide.mp4: video, 80x60, 12 frames")
    with pytest.raises(InvalidTaskError, match="not a readable file inside the input roots"):
        _open(layout, "guide.mp4")  # checked again, the link to the outside is refused as before


def test_image_swapped_after_the_check_reads_the_original(layout: dict[str, Path]) -> None:
    start = noise_image(layout["inputs"] / "start.png", seed=1)
    expected = np.asarray(Image.open(start).convert("RGB"))
    with _open(layout, "start.png", key="image_start") as opened:
        _swap_for_link(start, layout["outside"] / "secret.png")
        assert np.array_equal(np.asarray(load_image(opened, key="image_start")), expected)
        _image, note = prepare_i2v_image(opened, key="image_start", width=80, height=60)
        assert note["source"] == "start.png: image, 80x60"


def test_parent_directory_swapped_after_the_check_reads_the_original(layout: dict[str, Path]) -> None:
    sub = layout["inputs"] / "sub"
    sub.mkdir()
    noise_video(sub / "secret.mp4", 5, seed=1)  # same name as the outside file
    with _open(layout, "sub/secret.mp4") as opened:
        sub.rename(layout["inputs"] / "old")
        os.symlink(layout["outside"], sub)
        assert (sub / "secret.mp4").is_file()
        source = read_frames(opened, key="video_guide", limit=9)
        assert (source.width, source.height, source.total_frames) == (80, 60, 5)


def test_swap_between_resolving_and_opening_is_refused(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window inside open_input itself: the path passes the resolve check, then changes before the open."""
    guide = noise_video(layout["inputs"] / "guide.mp4", 3)
    sub = layout["inputs"] / "sub"
    sub.mkdir()
    noise_video(sub / "secret.mp4", 3)
    real_open = OpenedInput.open
    swap: list[Any] = []

    def racing_open(path: Path | str, *, follow_symlinks: bool = True) -> OpenedInput:
        if swap:  # once: the first candidate path only
            swap.pop()()
        return real_open(path, follow_symlinks=follow_symlinks)

    monkeypatch.setattr(paths.OpenedInput, "open", racing_open)
    # The file itself became a link to the outside: O_NOFOLLOW refuses it.
    swap.append(lambda: _swap_for_link(guide, layout["outside"] / "secret.mp4"))
    with pytest.raises(InvalidTaskError, match="not a readable file inside"):
        _open(layout, "guide.mp4")
    # A parent directory became a link to the outside: the open follows it, the descriptor check refuses it.
    swap.append(lambda: (sub.rename(layout["inputs"] / "old"), os.symlink(layout["outside"], sub)))
    with pytest.raises(InvalidTaskError, match="moved outside them"):
        _open(layout, "sub/secret.mp4")


def test_a_copy_sent_to_another_rank_reopens_only_the_checked_file(layout: dict[str, Path]) -> None:
    """A context-parallel group pickles the call: the copy reopens by path, and refuses another file there."""
    guide = noise_video(layout["inputs"] / "guide.mp4", 5, seed=1)
    with _open(layout, "guide.mp4") as opened:
        same = pickle.loads(pickle.dumps(opened))
        assert read_frames(same, key="video_guide", limit=9).total_frames == 5
        same.close()
        swapped = pickle.loads(pickle.dumps(opened))
        replacement = noise_video(layout["inputs"] / "other.mp4", 7, seed=2)
        os.replace(replacement, guide)  # a different file (inode) under the checked name
        with pytest.raises(InvalidRequestError, match="no longer the file that was checked"):
            read_frames(swapped, key="video_guide", limit=9)
        linked = pickle.loads(pickle.dumps(opened))
        _swap_for_link(guide, layout["outside"] / "secret.mp4")
        with pytest.raises(InvalidRequestError, match="not a readable video"):
            read_frames(linked, key="video_guide", limit=9)  # no symlink followed
        assert read_frames(opened, key="video_guide", limit=9).total_frames == 5  # the original still reads


def test_only_the_frames_used_are_decoded_through_the_descriptor(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    noise_video(layout["inputs"] / "long.mp4", 300, width=32, height=32)
    yielded = [0]
    real_iter = InputVideoReader.__iter__

    def counting(self: InputVideoReader) -> Iterator[bytes]:
        for raw in real_iter(self):
            yielded[0] += 1
            yield raw

    monkeypatch.setattr(InputVideoReader, "__iter__", counting)
    with _open(layout, "long.mp4") as opened:
        source = read_frames(opened, key="video_guide", limit=9)
    assert yielded[0] == 10 and len(source.frames) == 9 and source.total_frames == 300


def test_mp4_with_its_index_at_the_end_decodes_through_the_descriptor(layout: dict[str, Path]) -> None:
    """No +faststart: ffmpeg must seek to the moov atom at the end, which a pipe could not do."""
    path = layout["inputs"] / "tail-moov.mp4"
    writer = imageio_ffmpeg.write_frames(str(path), (32, 32), fps=8, macro_block_size=1, ffmpeg_log_level="error")
    writer.send(None)
    for grey in range(0, 250, 25):
        writer.send(np.full((32, 32, 3), grey, dtype=np.uint8).tobytes())
    writer.close()
    head = path.read_bytes()
    assert head.index(b"mdat") < head.index(b"moov")  # the index really is at the end
    with _open(layout, "tail-moov.mp4") as opened:
        source = read_frames(opened, key="video_guide", limit=4)
    assert (source.width, source.height, source.total_frames, len(source.frames)) == (32, 32, 10, 4)


# ---- 2: FIFOs ---------------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_fifo_named_like_a_video_fails_at_once(layout: dict[str, Path]) -> None:
    fifo = layout["inputs"] / "guide.mp4"
    os.mkfifo(fifo)  # no writer: a blocking open would wait forever
    start = time.monotonic()
    with pytest.raises(InvalidTaskError, match=r"not a readable file inside.*it is a FIFO, not a regular file"):
        _open(layout, "guide.mp4")
    with pytest.raises(InvalidRequestError, match=r"video_guide.*not a readable video.*FIFO"):
        read_frames(fifo, key="video_guide", limit=3)  # engine callers' paths are opened the same way
    with pytest.raises(InvalidRequestError, match=r"image_start.*not a readable image.*FIFO"):
        load_image(fifo.rename(layout["inputs"] / "start.png"), key="image_start")
    assert time.monotonic() - start < 5.0


def test_directory_is_refused_with_a_reason(layout: dict[str, Path]) -> None:
    (layout["inputs"] / "a-directory.mp4").mkdir()
    with pytest.raises(InvalidTaskError, match=r"not a readable file inside.*a directory"):
        _open(layout, "a-directory.mp4")


# ---- 3: symlinks inside the roots -------------------------------------------------------------------


def test_symlink_inside_the_roots_still_works(layout: dict[str, Path]) -> None:
    real = layout["inputs"] / "real"
    real.mkdir()
    guide = noise_video(real / "guide.mp4", 5, seed=1)
    os.symlink(guide, layout["inputs"] / "alias.mp4")
    os.symlink(real, layout["inputs"] / "linked-dir")
    for value in ("alias.mp4", "linked-dir/guide.mp4", str(layout["inputs"] / "alias.mp4")):
        with _open(layout, value) as opened:
            assert opened.path == guide.resolve()
            assert read_frames(opened, key="video_guide", limit=9).total_frames == 5
        assert resolve_input_path(value, [layout["inputs"]], layout["outputs"], key="video_guide") == guide.resolve()
    noise_video(layout["outputs"] / "previous.mp4", 3)  # the outputs dir is a root too
    with _open(layout, "previous.mp4") as opened:
        assert read_frames(opened, key="video_guide", limit=9).total_frames == 3


# ---- 4: container-level indirection -----------------------------------------------------------------


def test_concat_list_and_playlist_still_refused(layout: dict[str, Path]) -> None:
    secret = layout["outside"] / "secret.mp4"
    (layout["inputs"] / "guide.mp4").write_text(f"ffconcat version 1.0\nfile '{secret}'\n")
    (layout["inputs"] / "list.mkv").write_text(f"#EXTM3U\n{secret}\n")
    (layout["inputs"] / "file-url.mov").write_text(f"file:{secret}\n")
    for name, key in (("guide.mp4", "video_guide"), ("list.mkv", "video_mask"), ("file-url.mov", "video_guide")):
        with _open(layout, name, key=key) as opened, pytest.raises(InvalidRequestError) as info:
            read_frames(opened, key=key, limit=3)
        assert key in str(info.value) and "not a readable video" in str(info.value)
        assert "playlists and concat lists are refused" in str(info.value)


# ---- the runner: opened once, closed after -----------------------------------------------------------


def test_runner_opens_every_input_and_closes_them_on_refusal(
    layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    noise_video(layout["inputs"] / "guide.mp4", 3)
    noise_image(layout["inputs"] / "ref.png")
    runner = SimpleNamespace(input_roots=(layout["inputs"],), outputs_dir=layout["outputs"])

    def params(**kwargs: Any) -> SimpleNamespace:
        return SimpleNamespace(PATH_KEYS=("video_guide", "video_mask", "image_refs"), mode_kwargs=lambda: kwargs)

    opened = GenerationRunner._input_paths(runner, params(video_guide="guide.mp4", image_refs=["ref.png"]))  # type: ignore[arg-type]
    assert isinstance(opened["video_guide"], OpenedInput) and isinstance(opened["image_refs"][0], OpenedInput)
    assert opened["video_guide"].path == (layout["inputs"] / "guide.mp4").resolve()
    close_inputs(opened)
    assert opened["video_guide"].closed and opened["image_refs"][0].closed

    seen: list[OpenedInput] = []
    real_open_input = paths.open_input

    def recording(*args: Any, **kwargs: Any) -> OpenedInput:
        seen.append(real_open_input(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr("worker.tasks.runner.open_input", recording)
    refused = params(video_guide="guide.mp4", image_refs=["ref.png", "nope.png"])
    with pytest.raises(InvalidTaskError, match=r"image_refs\[1\] 'nope.png' is not a readable file"):
        GenerationRunner._input_paths(runner, refused)  # type: ignore[arg-type]
    assert len(seen) == 2 and all(item.closed for item in seen)


# ---- through the engine: WanOrchestrator reads the opened inputs, not their names ----------------------


def test_orchestrator_generates_from_the_opened_inputs(
    layout: dict[str, Path], tiny_models_dir: Path, tmp_path: Path
) -> None:
    from headless_wgp import WanOrchestrator

    guide = noise_video(layout["inputs"] / "guide.mp4", 5, seed=1)
    start = noise_image(layout["inputs"] / "start.png", seed=1)
    orchestrator = WanOrchestrator(tiny_models_dir)
    try:
        with _open(layout, "guide.mp4") as opened_guide, _open(layout, "start.png", key="image_start") as opened_start:
            _swap_for_link(guide, layout["outside"] / "secret.mp4")
            _swap_for_link(start, layout["outside"] / "secret.png")
            orchestrator.load_model("tiny_vace")
            vace = orchestrator.generate_vace(
                "x", video_guide=opened_guide, image_refs=[opened_start], output_path=tmp_path / "v.mp4", seed=1
            )
            assert vace.inputs["video_guide"]["source"].startswith("guide.mp4: video, 80x60, 5 frames")
            assert vace.inputs["image_refs"][0].startswith("start.png: 80x60")
            orchestrator.load_model("tiny_i2v")
            i2v = orchestrator.generate_i2v("x", image_start=opened_start, output_path=tmp_path / "i.mp4", seed=1)
            assert i2v.inputs["image_start"]["source"] == "start.png: image, 80x60"  # the secret is 32x32
    finally:
        orchestrator.unload_model()
