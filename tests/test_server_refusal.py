"""A preset with a ``refuse`` detector: flagged requests get the fixed message and the response names the detector;
the same batch's other requests are answered by the model as usual."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from test_server_support import MODEL_NAME, serving_guard, words

MESSAGE = "w100 w101 w102"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with serving_guard(tmp_path_factory.mktemp("presets"), MESSAGE, batch_wait_ms=200) as base:
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
