"""GGUF checkpoints (llama.cpp's format) load through ``load_model``, converted once into the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from steerlib import load_model
from steerlib.hf.loading import embedded_gguf_path


@pytest.mark.real_model
def test_a_gguf_file_loads_converted_once_with_the_embedded_models_weights(tmp_path: Path) -> None:
    gguf = embedded_gguf_path()  # the embedded model's own GGUF, loaded as any user's .gguf file would be
    model, tok = load_model(str(gguf), cache_dir=tmp_path)
    (folder,) = [p for p in (tmp_path / "models").glob("gguf-*") if p.is_dir()]
    marker = (folder / "steerlib_conversion.json").stat().st_mtime_ns
    again, _ = load_model(str(gguf), cache_dir=tmp_path)
    assert (folder / "steerlib_conversion.json").stat().st_mtime_ns == marker  # not converted twice
    ref, ref_tok = load_model()
    assert type(model) is type(ref) and tok.chat_template == ref_tok.chat_template
    for (name, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), name
    assert all(torch.equal(p, q) for p, q in zip(again.parameters(), model.parameters(), strict=True))


def test_other_files_are_refused_naming_what_loads(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(NotADirectoryError, match=r"a \.gguf checkpoint"):
        load_model(str(tmp_path / "weights.bin"))
