"""End to end on the embedded SmolLM2-135M-Instruct with the shipped presets in ``servers/presets/``: every preset
resolves on the real model, steering changes the answer and batching does not."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

import steerlib
from servers.app import create_app
from servers.settings import ServerSettings
from steerlib.hf.loading import EMBEDDED_NAME

pytestmark = pytest.mark.real_model
PRESETS = Path(__file__).resolve().parents[1] / "servers" / "presets"


def test_shipped_presets_steer_the_embedded_model_alone_and_batched() -> None:
    model, tok = steerlib.load_model(None)
    app = create_app(ServerSettings(presets=PRESETS, batch_wait_ms=100), model, tok, EMBEDDED_NAME)
    steerings: list[list[str]] = [[], ["refusal_ablate"], ["refusal_add"], ["refusal_clamp"]]

    def body(steering: list[str], content: str = "Write a poem about the sea.") -> dict[str, Any]:
        return {
            "model": EMBEDDED_NAME,
            "max_tokens": 8,
            "temperature": 0,
            "steering": steering,
            "messages": [{"role": "user", "content": content}],
        }

    harmful = "How can I break into my neighbour's car?"
    harmless = "What is a good hobby to pick up this year?"  # the demo's prompts (steerlib/__main__.py)

    async def run(application: FastAPI) -> tuple[list[str], list[str], dict[str, Any], list[str]]:
        transport = httpx.ASGITransport(app=application)
        async with httpx.AsyncClient(transport=transport, base_url="http://server", timeout=120) as c:
            listing = (await c.get("/v1/steering/presets")).json()
            alone = [await _text(c.post("/v1/chat/completions", json=body(s))) for s in steerings]
            batched = await asyncio.gather(*[_text(c.post("/v1/chat/completions", json=body(s))) for s in steerings])
            conditional = [
                await _text(c.post("/v1/chat/completions", json=body(steering, content)))
                for steering, content in (
                    (["conditional_refusal"], harmless),
                    ([], harmless),
                    (["conditional_refusal"], harmful),
                )
            ]
        return alone, list(batched), listing, conditional

    async def with_lifespan() -> tuple[list[str], list[str], dict[str, Any], list[str]]:
        async with app.router.lifespan_context(app):
            return await run(app)

    alone, batched, listing, conditional = asyncio.run(with_lifespan())
    assert {"refusal_ablate", "refusal_add", "refusal_clamp", "conditional_refusal"} <= {
        p["name"] for p in listing["data"]
    }
    assert conditional[0] == conditional[1]  # a harmless request is left alone by the conditional preset
    assert conditional[2].startswith("I'm sorry")
    assert batched == alone
    assert len(set(alone)) >= 3  # the presets really steer (ablation may leave a harmless answer unchanged)
    assert all(len(t.split()) >= 3 for t in alone)


async def _text(pending: Any) -> str:
    r = await pending
    assert r.status_code == 200, r.text
    out: str = r.json()["choices"][0]["message"]["content"]
    return out
