"""add_device_arguments: the one --device/--dtype pair every command line (steerlib, evals, recipes, bench) shares."""

from __future__ import annotations

import argparse

import pytest

from steerlib.devices import add_device_arguments


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cmd")
    add_device_arguments(p)
    return p


def test_defaults_are_auto() -> None:
    args = _parser().parse_args([])
    assert (args.device, args.dtype) == ("auto", "auto")


def test_values_are_kept_and_dtype_aliases_made_canonical() -> None:
    args = _parser().parse_args(["--device", "cuda:1", "--dtype", "bf16"])
    assert (args.device, args.dtype) == ("cuda:1", "bfloat16")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "gpu"], "argument --device: device 'gpu' is not one of: auto (CUDA when present, else cpu)"),
        (["--dtype", "fp8"], "argument --dtype: dtype 'fp8' is not one of: auto (the checkpoint's dtype"),
    ],
)
def test_a_bad_value_is_a_usage_error_listing_the_allowed_forms(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _parser().parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err
