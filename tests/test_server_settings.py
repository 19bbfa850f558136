"""Server settings: flags beat STEERLIB_SERVER_* env variables, which beat the YAML file; unknown keys are errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from servers.__main__ import parse_args
from servers.settings import load_settings


def test_flags_beat_env_which_beats_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("port: 9000\nmax_batch: 4\nmax_queue: 7\napi_key: from-yaml\n")
    monkeypatch.setenv("STEERLIB_SERVER_PORT", "9001")
    monkeypatch.setenv("STEERLIB_SERVER_MAX_BATCH", "5")
    s = load_settings({"max_batch": "8"}, cfg)
    assert (s.port, s.max_batch, s.max_queue, s.api_key) == (9001, 8, 7, "from-yaml")


def test_unknown_keys_are_errors(tmp_path: Path) -> None:
    cfg = tmp_path / "server.yaml"
    cfg.write_text("max_bacth: 4\n")
    with pytest.raises(ValidationError, match="max_bacth"):
        load_settings({}, cfg)
    with pytest.raises(ValidationError, match="prot"):
        load_settings({"prot": 1})
    with pytest.raises(FileNotFoundError):
        load_settings({}, tmp_path / "missing.yaml")


def test_command_line_flags(tmp_path: Path) -> None:
    flags, config = parse_args(["--port", "1234", "--default-presets", "a", "b", "--config", str(tmp_path / "s.yaml")])
    assert flags == {"port": "1234", "default_presets": ["a", "b"]} and config == tmp_path / "s.yaml"
    assert load_settings(flags).port == 1234
    with pytest.raises(SystemExit):
        parse_args(["--no-such-flag", "1"])


def test_several_feature_indexes_by_flag_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    flags, _ = parse_args(["--features", "idx/a", "idx/b"])
    assert load_settings(flags).features == [Path("idx/a"), Path("idx/b")]
    monkeypatch.setenv("STEERLIB_SERVER_FEATURES", "idx/c:idx/d")
    assert load_settings({}).features == [Path("idx/c"), Path("idx/d")]
