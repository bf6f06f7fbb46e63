"""Headless-Wan2GP rows -> our tasks (worker.tasks.hw_compat), on payloads in HW's own shapes.

The payloads follow HW's clients: `add_task.py` puts `task_id` / `project_id` in params; the travel
orchestrator rows of its `generate_test_tasks.py` and `create_test_task.py` carry `orchestrator_details`
with `*_expanded` lists; generation rows use Wan2GP's names and letter codes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker.tasks.hw_compat import CAUSVID_LORA, round_resolution, translate_hw_task
from worker.tasks.params import InvalidTaskError

ARCHITECTURES = {"tiny_t2v": "t2v", "tiny_vace": "vace", "tiny_i2v": "i2v", "t2v": "t2v", "i2v_14B": "i2v"}


def translate(task_type: str, params: dict[str, Any], **kwargs: Any) -> Any:
    return translate_hw_task(task_type, params, architecture_of=ARCHITECTURES.get, **kwargs)


def test_a_native_row_is_left_alone() -> None:
    assert translate("t2v", {"prompt": "a cat", "model": "tiny_t2v"}) is None
    assert translate("travel_orchestrator", {"input_images": ["a", "b"], "base_prompts": "x"}) is None


def test_on_an_hw_table_plain_rows_take_hws_default_models() -> None:
    translated = translate("t2v", {"prompt": "a cat"}, hw_table=True)
    assert (translated.task_type, translated.params["model"]) == ("t2v", "t2v")  # HW: the 14B, not our 1.3B
    assert translate("vace", {"prompt": "x", "video_guide": "g.mp4"}, hw_table=True).params["model"] == (
        "vace_14B_cocktail_2_2"
    )


def test_bookkeeping_keys_are_recorded_and_ignored() -> None:
    params = {"prompt": "a cat", "model": "tiny_t2v", "task_id": "t2v_abc", "project_id": "p1", "run_id": "r"}
    translated = translate("t2v", params)
    assert translated.params == {"prompt": "a cat", "model": "tiny_t2v"}
    assert translated.record()["ignored"] == {"task_id": "t2v_abc", "project_id": "p1", "run_id": "r"}


def test_generate_video_picks_the_mode_from_the_model_and_inputs() -> None:
    assert translate("generate_video", {"prompt": "p", "model": "tiny_t2v"}).task_type == "t2v"
    assert translate("generate_video", {"prompt": "p", "model": "tiny_i2v", "image_start": "s.png"}).task_type == (
        "i2v"
    )
    vace = translate("generate_video", {"prompt": "p", "model": "tiny_vace", "video_guide": "g.mp4"})
    assert vace.task_type == "vace"
    assert translate("generate_video", {"prompt": "p"}).params["model"] == "t2v"  # HW's default


def test_single_image_and_t2i_are_one_frame_generations() -> None:
    single = translate("single_image", {"prompt": "p", "model": "tiny_t2v", "video_length": 81, "steps": 4})
    assert single.task_type == "t2v"
    assert single.params == {"prompt": "p", "model": "tiny_t2v", "video_length": 1, "num_inference_steps": 4}
    assert "set to 1" in single.record()["changes"][0]
    t2i = translate("wan_2_2_t2i", {"prompt": "p"})
    assert (t2i.task_type, t2i.params["model"], t2i.params["video_length"]) == ("t2v", "t2v_2_2", 1)


def test_wan2gp_letter_codes_decide_which_inputs_are_used() -> None:
    base = {"prompt": "p", "model": "tiny_vace", "video_guide": "g.mp4", "video_mask": "m.mp4", "image_refs": ["r"]}
    with_mask = translate("vace", {**base, "video_prompt_type": "VM", "keep_frames_video_guide": ""})
    assert with_mask.params["video_mask"] == "m.mp4" and "image_refs" not in with_mask.params
    assert "not used" in with_mask.record()["ignored"]["image_refs"]
    new_style = translate("vace", {**base, "video_prompt_type": "VAI"}).params
    assert new_style["video_mask"] == "m.mp4" and new_style["image_refs"] == ["r"]
    unmasked = translate("vace", {**base, "video_prompt_type": "VAU"}).params
    assert "video_mask" not in unmasked
    start_only = translate("i2v", {"prompt": "p", "image_start": "s", "image_end": "e", "image_prompt_type": "S"})
    assert start_only.params["image_start"] == "s" and "image_end" not in start_only.params


def test_letters_asking_for_preprocessing_fail_naming_them() -> None:
    with pytest.raises(InvalidTaskError, match=r"video_prompt_type = 'PV'.*letter\(s\) P"):
        translate("vace", {"prompt": "p", "video_guide": "g.mp4", "video_prompt_type": "PV"})


def test_wan2gp_names_map_onto_ours() -> None:
    params = {
        "prompt": "p",
        "model": "tiny_vace",
        "video_guide": "g.mp4",
        "control_net_weight": 0.8,
        "activated_loras": ["a.safetensors", "b.safetensors"],
        "loras_multipliers": "1.0 0.5",
        "steps": 6,
        "num_frames": 17,
        "seed_to_use": 42,
    }
    out = translate("vace", params).params
    assert out["control_scale"] == 0.8 and out["num_inference_steps"] == 6 and out["video_length"] == 17
    assert out["lora_names"] == ["a.safetensors", "b.safetensors"] and out["lora_multipliers"] == "1.0 0.5"
    assert out["seed"] == 42


def test_additional_loras_given_as_urls_become_file_names() -> None:
    url = "https://huggingface.co/owner/repo/resolve/main/style%20lora.safetensors"
    translated = translate("t2v", {"prompt": "p", "additional_loras": {url: 0.7}})
    assert translated.params["lora_names"] == ["style lora.safetensors"]
    assert translated.params["lora_multipliers"] == "0.7"
    assert translated.lora_urls == {"style lora.safetensors": url}


def test_use_causvid_lora_applies_hws_defaults() -> None:
    out = translate("t2v", {"prompt": "p", "use_causvid_lora": True, "steps": 30, "guidance_scale": 5.0}).params
    assert out["lora_names"] == [CAUSVID_LORA] and out["lora_multipliers"] == "1.0"
    assert (out["num_inference_steps"], out["guidance_scale"], out["flow_shift"]) == (9, 1.0, 1.0)


def test_resolution_is_rounded_down_as_hw_does_and_recorded() -> None:
    assert round_resolution("902x508") == (
        "896x496",
        "resolution 902x508 rounded down to 896x496 (multiples of 16, as HW does)",
    )
    translated = translate("t2v", {"prompt": "p", "resolution": "902x508", "task_id": "x"})
    assert translated.params["resolution"] == "896x496"
    assert translated.record()["changes"]


def test_settings_are_accepted_only_at_their_off_value() -> None:
    assert translate("t2v", {"prompt": "p", "tea_cache_setting": 0, "RIFLEx_setting": 0}).params == {
        "prompt": "p",
        "model": "t2v",
    }
    with pytest.raises(InvalidTaskError, match=r"tea_cache_setting = 2\.0 .*only its off value"):
        translate("t2v", {"prompt": "p", "tea_cache_setting": 2.0})


def test_a_truly_unknown_key_still_fails_naming_it() -> None:
    with pytest.raises(InvalidTaskError, match=r"unknown key 'wobble' .*generate_video"):
        translate("generate_video", {"prompt": "p", "wobble": 1})


def test_hw_types_we_do_not_serve_fail_naming_the_type() -> None:
    with pytest.raises(InvalidTaskError, match=r"task_type 'qwen_image_edit' is not served.*travel_orchestrator"):
        translate("qwen_image_edit", {"prompt": "p"})
    with pytest.raises(InvalidTaskError, match=r"unknown task_type 'wibble'"):
        translate("wibble", {"prompt": "p"})
    with pytest.raises(InvalidTaskError, match="made by a Headless-Wan2GP orchestrator"):
        translate("travel_segment", {"orchestrator_task_id_ref": "o", "segment_index": 0})


def hw_travel(**details: Any) -> dict[str, Any]:
    """A travel_orchestrator row as HW's generate_test_tasks.py builds it (adapted to a tiny model)."""
    orchestrator = {
        "run_id": "20261201093000",
        "input_image_paths_resolved": ["a.png", "b.png", "c.png"],
        "parsed_resolution_wh": "902x508",
        "model_name": "tiny_vace",
        "use_causvid_lora": False,
        "num_new_segments_to_generate": 2,
        "base_prompts_expanded": ["red to green", "green to blue"],
        "negative_prompts_expanded": ["", ""],
        "segment_frames_expanded": [13, 13],
        "frame_overlap_expanded": [4, 4],
        "fps_helpers": 16,
        "fade_in_params_json_str": "{}",
        "fade_out_params_json_str": "{}",
        "seed_base": 7,
        "main_output_dir_for_run": "./outputs",
        "steps": 3,
        **details,
    }
    return {"task_id": "travel_1", "project_id": "default_project_id", "orchestrator_details": orchestrator}


def test_travel_orchestrator_details_become_our_travel_params() -> None:
    translated = translate("travel_orchestrator", hw_travel())
    assert translated.task_type == "travel_orchestrator"
    assert translated.params == {
        "run_id": "20261201093000",
        "input_images": ["a.png", "b.png", "c.png"],
        "resolution": "896x496",
        "model": "tiny_vace",
        "base_prompts": ["red to green", "green to blue"],
        "negative_prompts": ["", ""],
        "segment_frames": [13, 13],
        "frame_overlap": [4],  # HW lists one per segment and uses one per join
        "fps": 16,
        "seed_base": 7,
        "num_inference_steps": 3,
        "crossfade_sharpen": 0.3,  # HW's stitch default
    }
    assert translated.record()["ignored"]["orchestrator_details.main_output_dir_for_run"] == "./outputs"


def test_travel_phase_config_sets_steps_guidance_and_shift_and_refuses_its_loras() -> None:
    phases = {"num_phases": 2, "steps_per_phase": [2, 2], "flow_shift": 5, "sample_solver": "unipc"}
    phases["phases"] = [{"phase": 1, "guidance_scale": 3, "loras": []}, {"phase": 2, "guidance_scale": 1}]
    out = translate("travel_orchestrator", hw_travel(phase_config=phases)).params
    assert (out["num_inference_steps"], out["flow_shift"], out["guidance_scale"], out["guidance2_scale"]) == (
        4,
        5,
        3.0,
        1.0,
    )
    phases["phases"][0]["loras"] = [{"url": "https://huggingface.co/x/y/resolve/main/l.safetensors", "multiplier": 1}]
    with pytest.raises(InvalidTaskError, match="phase_config has LoRAs"):
        translate("travel_orchestrator", hw_travel(phase_config=phases))


def test_single_image_travel_is_refused_with_the_reason() -> None:
    with pytest.raises(InvalidTaskError, match="single-image travel is not supported"):
        translate("travel_orchestrator", hw_travel(input_image_paths_resolved=["a.png"]))


def test_an_individual_travel_segment_runs_as_one_generation_or_a_one_segment_travel() -> None:
    """HW's create_test_task.py `uni3c_baseline` row, adapted to tiny models and without uni3c."""
    segment = {
        "model_name": "tiny_i2v",
        "num_frames": 29,
        "parsed_resolution_wh": "902x508",
        "seed_to_use": 42,
        "segment_index": 0,
        "is_first_segment": True,
        "is_last_segment": True,
        "debug_mode_enabled": False,
        "orchestrator_details": {"steps": 6, "model_type": "i2v"},
        "individual_segment_params": {
            "num_frames": 29,
            "base_prompt": "a bus",
            "negative_prompt": "",
            "seed_to_use": 42,
            "random_seed": False,
            "start_image_url": "start.jpg",
            "end_image_url": "end.jpg",
            "after_first_post_generation_brightness": 0,
        },
        "use_uni3c": False,
    }
    i2v = translate("individual_travel_segment", segment)
    assert i2v.task_type == "i2v"
    assert {k: i2v.params[k] for k in ("image_start", "image_end", "video_length", "prompt", "resolution")} == {
        "image_start": "start.jpg",
        "image_end": "end.jpg",
        "video_length": 29,
        "prompt": "a bus",
        "resolution": "896x496",
    }
    vace = translate("individual_travel_segment", {**segment, "model_name": "tiny_vace"})
    assert vace.task_type == "travel_orchestrator"
    assert vace.params["input_images"] == ["start.jpg", "end.jpg"] and vace.params["segment_frames"] == 29


def test_task_info_reads_like_hws_result_dict() -> None:
    """HW's README script: `if result.get("success"): print(result['output_path']) else: result.get('error')`."""
    from headless_model_management import TaskInfo
    from worker.task import TaskStatus

    done = TaskInfo("t", TaskStatus.COMPLETE, "files/t.mp4", None, None, {"output_file": "/abs/t.mp4"}, 1)
    assert done.get("success") is True and done["output_path"] == "/abs/t.mp4" and done.get("error") is None
    failed = TaskInfo("t", TaskStatus.FAILED, None, "boom", None, None, 3)
    assert failed.get("success") is False and failed.get("error") == "boom" and failed["attempts"] == 3
    with pytest.raises(KeyError):
        failed["nope"]


def test_hws_queue_arguments_are_accepted(tmp_path: Path) -> None:
    """HW's README: `HeadlessTaskQueue(wan_dir=str(wan_root), max_workers=1)`: a Wan2GP checkout's folders."""
    from headless_model_management import HeadlessTaskQueue

    wan = tmp_path / "Wan2GP"
    for sub in ("ckpts", "defaults", "finetunes", "loras"):
        (wan / sub).mkdir(parents=True)
    with HeadlessTaskQueue(f"sqlite:///{tmp_path / 'q.db'}", wan_dir=str(wan), max_workers=1) as queue:
        assert queue.settings.models_dir == wan / "ckpts"
        assert queue.settings.loras_dirs == (wan / "loras",)
        assert tuple(queue.settings.presets_dir or ()) == (wan / "defaults", wan / "finetunes")
    with pytest.raises(ValueError, match="max_workers=2"):
        HeadlessTaskQueue(f"sqlite:///{tmp_path / 'q.db'}", max_workers=2)
