"""A preset with a ``refuse`` detector: flagged requests get the fixed message and the response names the detector;
the same batch's other requests are answered by the model as usual."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_server_support import MODEL_NAME, make_app, make_presets, serving, words
from tiny_models import tiny_model

MESSAGE = "w100 w101 w102"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = make_presets(tmp_path_factory.mktemp("presets"))
    guard = {
        "description": "refuse every prompt (a probe with an unreachable threshold)",
        "interventions": [{
            "op": "refuse", "layer": 1, "name": "always", "message": MESSAGE,
            "apply": {"when": {"vector": "vectors/push.safetensors", "above": -1.0e9, "scope": "prompt"}},
        }],
    }  # fmt: skip
    (Path(root) / "guard.yaml").write_text(yaml.safe_dump(guard))
    with serving(make_app(root, tiny_model("llama", 3), batch_wait_ms=200)) as base:
        yield base


def body(steering: list[str], content: str) -> dict[str, Any]:
    return {"model": MODEL_NAME, "temperature": 0, "max_tokens": 6, "steering": steering,
            "messages": [{"role": "user", "content": content}]}  # fmt: skip


def test_detector_answers_flagged_rows_and_says_so(url: str) -> None:
    async def both() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as c:
            return list(await asyncio.gather(
                c.post("/v1/chat/completions", json=body(["guard"], words(10, 11))),
                c.post("/v1/chat/completions", json=body([], words(10, 11))),
            ))  # fmt: skip

    guarded, plain = (r.json() for r in asyncio.run(both()))
    assert guarded["choices"][0]["message"]["content"] == MESSAGE
    assert guarded["choices"][0]["finish_reason"] == "stop"
    assert guarded["steering_refusal"] == {"detector": "always"}
    assert guarded["usage"]["completion_tokens"] == 4  # three words and the end of turn
    assert "steering_refusal" not in plain
    assert plain["choices"][0]["message"]["content"] != MESSAGE
