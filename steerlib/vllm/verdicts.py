"""Which ``refuse`` detector answered a request, carried from vLLM's workers back to a server that owns the engine.

vLLM's outputs have no field a logits processor can fill, and the verdict is made in the worker (the gate reads the
prompt's activations there). A server that starts the engine itself (``python -m servers --engine vllm``) names a
private folder in ``$STEERLIB_VLLM_VERDICTS`` before the engine's processes start, and gives each steered request a
random tag in ``SamplingParams.extra_args["steerlib_tag"]``; a worker whose detector fires for that request writes
the detector's name to ``FOLDER/TAG`` (atomically; every tensor-parallel rank writes the same name), and the server
takes it when the request finishes. Without the variable nothing is written, whatever a request carries; a tag that
is not 32 hexadecimal digits is ignored, so a client of ``vllm serve`` cannot make a worker write anywhere.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

VERDICTS_ENV = "STEERLIB_VLLM_VERDICTS"
TAG_KEY = "steerlib_tag"
_TAG = re.compile(r"[0-9a-f]{32}\Z")


def new_tag() -> str:
    return secrets.token_hex(16)


def tag_of(extra_args: Mapping[str, Any] | None) -> str | None:
    """The request's tag if it carries a well-formed one."""
    tag = (extra_args or {}).get(TAG_KEY)
    return tag if isinstance(tag, str) and _TAG.match(tag) else None


def record(tag: str | None, detector: str) -> None:
    """In a worker: ``detector`` answered the request tagged ``tag`` (a no-op without a folder or a tag)."""
    folder = os.environ.get(VERDICTS_ENV)
    if not folder or tag is None or not _TAG.match(tag):
        return
    target = Path(folder) / tag
    tmp = target.with_name(f".{tag}.{os.getpid()}")
    tmp.write_text(detector, encoding="utf-8")
    os.replace(tmp, target)


def take(folder: Path, tag: str) -> str | None:
    """In the server: the detector that answered the request tagged ``tag``, or None; the record is removed."""
    path = folder / tag
    try:
        name = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    path.unlink(missing_ok=True)
    return name
