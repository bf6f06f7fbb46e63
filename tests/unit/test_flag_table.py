"""The README's `run` flag table is generated from the parser and EnvironmentSettings (issue 17), and every
WAN_* setting is read and checked in one place."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.cli import main
from worker.cli.flag_table import END, START, _run_actions, flag_rows, flag_table, readme_table
from worker.config import ENV_ONLY, ConfigError, EnvironmentSettings, environment_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_table_is_the_generated_one(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in EnvironmentSettings.model_fields:
        monkeypatch.delenv(f"WAN_{name.upper()}", raising=False)
    assert readme_table(README) == flag_table(), (
        f"README.md's flag table differs from the flags: regenerate it with `python -m worker.cli.flag_table` "
        f"and paste it between {START} and {END}"
    )


def test_every_setting_has_a_row_and_every_run_flag_has_help() -> None:
    environment = {row[1].strip("`") for row in flag_rows()}
    assert {f"WAN_{name.upper()}" for name in EnvironmentSettings.model_fields} <= environment
    assert set(ENV_ONLY) <= set(EnvironmentSettings.model_fields)
    for action in _run_actions():
        assert action.help, f"{action.option_strings} has no help text"


def test_a_bad_environment_value_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WAN_PARALLEL", "two")
    with pytest.raises(ConfigError, match=r"WAN_PARALLEL='two': .*integer"):
        environment_settings()
    assert main(["list"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: WAN_PARALLEL='two'")


def test_new_environment_variables_set_the_http_and_log_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli.parser import build_parser

    monkeypatch.setenv("WAN_HTTP", "127.0.0.1:9999")
    monkeypatch.setenv("WAN_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("WAN_LOG_JSON", "1")
    monkeypatch.setenv("WAN_ALLOW_DOWNLOAD", "yes")
    args = build_parser().parse_args(["run"])
    assert (args.http, args.log_level, args.log_json, args.allow_download) == ("127.0.0.1:9999", "DEBUG", True, True)
    assert build_parser().parse_args(["run", "--http", "127.0.0.1:1"]).http == "127.0.0.1:1"  # the flag wins
