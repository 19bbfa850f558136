"""Server settings: flags beat STEERLIB_SERVER_* env variables, which beat the YAML file; unknown keys are errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from tiny_models import tiny_model, word_tokenizer

from servers.__main__ import load_served_model, parse_args
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


def test_device_and_dtype_default_to_auto() -> None:
    s = load_settings({})
    assert (s.device, s.dtype) == ("auto", "auto")


def test_device_and_dtype_by_flag_env_or_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flags, _ = parse_args(["--device", "cuda:1", "--dtype", "bf16"])
    s = load_settings(flags)
    assert (s.device, s.dtype) == ("cuda:1", "bfloat16")  # the alias is stored under its canonical name
    cfg = tmp_path / "server.yaml"
    cfg.write_text("device: cpu\ndtype: float16\n")
    s = load_settings({}, cfg)
    assert (s.device, s.dtype) == ("cpu", "float16")
    monkeypatch.setenv("STEERLIB_SERVER_DEVICE", "cuda")
    monkeypatch.setenv("STEERLIB_SERVER_DTYPE", "float32")
    s = load_settings({}, cfg)
    assert (s.device, s.dtype) == ("cuda", "float32")
    s = load_settings(flags, cfg)
    assert (s.device, s.dtype) == ("cuda:1", "bfloat16")


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("device", "gpu", "cpu, cuda, cuda:N"),
        ("device", "cuda:x", "cpu, cuda, cuda:N"),
        ("dtype", "fp8", "bfloat16, float16, float32"),
        ("dtype", ["bf16"], "bfloat16, float16, float32"),
    ],
)
def test_bad_device_or_dtype_names_the_field_and_the_allowed_forms(field: str, value: object, allowed: str) -> None:
    with pytest.raises(ValidationError) as err:
        load_settings({field: value})
    (e,) = err.value.errors()
    assert e["loc"] == (field,)
    assert f"{field} {value!r} is not one of" in e["msg"] and allowed in e["msg"]


def test_the_server_loads_its_model_on_the_device_and_dtype_set(tmp_path: Path) -> None:
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", n_layers=2).save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    flags, _ = parse_args(["--model", str(folder), "--device", "cpu", "--dtype", "bfloat16"])
    model, _, name = load_served_model(load_settings(flags))
    assert {(p.device, p.dtype) for p in model.parameters()} == {(torch.device("cpu"), torch.bfloat16)}
    assert name == "tiny-llama"
    model, _, _ = load_served_model(load_settings({"model": str(folder)}))
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # auto keeps a float32 checkpoint's dtype


def test_engine_settings_come_from_flags_and_belong_to_their_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    flags, _ = parse_args(["--engine", "vllm", "--tensor-parallel-size", "2", "--vllm-args", '{"max_model_len": 4096}'])
    s = load_settings(flags)
    assert (s.engine, s.tensor_parallel_size, s.vllm_args) == ("vllm", 2, {"max_model_len": 4096})
    monkeypatch.setenv("STEERLIB_SERVER_VLLM_ARGS", '{"enforce_eager": true}')
    assert load_settings({"engine": "vllm"}).vllm_args == {"enforce_eager": True}
    monkeypatch.delenv("STEERLIB_SERVER_VLLM_ARGS")
    bad = [
        ({"engine": "sglang"}, "engine"),
        ({"engine": "vllm", "vllm_args": "{max_model_len: 1}"}, "vllm_args must be a JSON object"),
        ({"engine": "vllm", "device": "cuda:1"}, "device: 'cuda:1' with engine vllm"),
        ({"engine": "vllm", "audit_log": "a.jsonl"}, "audit_log needs engine hf"),
        ({"tensor_parallel_size": 2}, "tensor_parallel_size is a setting of engine vllm"),
        ({"vllm_args": '{"max_model_len": 1}'}, "vllm_args is a setting of engine vllm"),
    ]
    for flags, message in bad:
        with pytest.raises(ValidationError, match=message):
            load_settings(flags)


def test_vllm_arguments_the_server_owns_are_refused_by_name() -> None:
    """Checked before vLLM is imported (unknown names are checked against vLLM's own list:
    ``tests/test_vllm_serving.py``)."""
    from servers.vllm_engine import VllmLaunch

    for key in ("scheduler_cls", "logits_processors", "model", "dtype", "tensor_parallel_size"):
        with pytest.raises(ValueError, match=f"vllm_args: '{key}' is set by the server"):
            VllmLaunch("m", extra={key: "x"}).engine_args()


def test_engine_vllm_without_vllm_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM looks like to find_spec
    with pytest.raises(
        SystemExit, match=r"--engine vllm needs vLLM in this environment: pip install 'steerlib\[vllm\]'"
    ):
        load_served_model(load_settings({"engine": "vllm"}))
