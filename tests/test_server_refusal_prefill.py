"""A ``prefill``-mode ``refuse`` preset: the served reply opens with the message and the model continues it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from test_server_support import MODEL_NAME, make_app, make_presets, serving, words
from tiny_models import tiny_model

PREFIX = "w100 w101 w102"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = make_presets(tmp_path_factory.mktemp("presets"))
    guard = {
        "description": "open every reply with a refusal prefix (a probe with an unreachable threshold)",
        "interventions": [{
            "op": "refuse", "layer": 1, "name": "always", "message": PREFIX, "mode": "prefill",
            "apply": {"when": {"vector": "vectors/push.safetensors", "above": -1.0e9, "scope": "prompt"}},
        }],
    }  # fmt: skip
    (Path(root) / "guard.yaml").write_text(yaml.safe_dump(guard))
    with serving(make_app(root, tiny_model("llama", 3))) as base:
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
