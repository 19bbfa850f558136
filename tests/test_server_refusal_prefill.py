"""A ``prefill``-mode ``refuse`` preset: the served reply opens with the message and the model continues it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from test_server_support import MODEL_NAME, serving_guard, words

PREFIX = "w100 w101 w102"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with serving_guard(tmp_path_factory.mktemp("presets"), PREFIX, mode="prefill") as base:
        yield base


def test_reply_starts_with_the_prefix_and_the_model_goes_on(url: str) -> None:
    body = {"model": MODEL_NAME, "temperature": 0, "max_tokens": 8, "steering": ["guard"],
            "messages": [{"role": "user", "content": words(10, 11)}]}  # fmt: skip
    r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    out = r.json()
    assert r.status_code == 200, out
    text = out["choices"][0]["message"]["content"]
    assert text.startswith(PREFIX) and len(text.split()) > 3
    assert out["usage"]["completion_tokens"] > 3
    assert out["steering_refusal"] == {"detector": "always"}
