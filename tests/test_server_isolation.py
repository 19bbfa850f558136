"""One request's steering never leaks into another's: 16 concurrent requests with mixed steering, batched, each
equal to the same request served alone (greedy, fp32, left padding), and at least one batch really was shared."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from test_server_support import MODEL_NAME, D, make_app, make_presets, serving, words

GEN = torch.Generator().manual_seed(3)
INLINE = (torch.randn(D, generator=GEN) * 4).tolist()
STEERINGS: list[Any] = [
    [],
    ["push"],
    ["erase"],
    ["sae_edit"],
    ["push", "sae_edit"],
    {"interventions": [{"op": "add", "layer": 0, "vector": INLINE, "coefficient": 1.5}]},
    {
        "interventions": [
            {
                "op": "add",
                "layer": 2,
                "vector": {"preset_vector": "push"},
                "relative": True,
                "coefficient": 0.8,
                "apply": {"tokens": "generated"},
            }
        ]
    },
    {
        "presets": ["erase"],
        "interventions": [
            {"op": "sae", "layer": 1, "sae": "probe", "edits": [{"feature": 5, "mode": "scale", "value": 0.0}]}
        ],
    },
]
PROMPTS = [words(10, 11, 12), words(40), words(50, 51, 52, 53, 54, 55, 56), words(90, 91)]
N_NEW = 10


def body(i: int) -> dict[str, Any]:
    return {
        "model": MODEL_NAME,
        "max_tokens": N_NEW,
        "temperature": 0,
        "steering": STEERINGS[i % len(STEERINGS)],
        "messages": [{"role": "user", "content": PROMPTS[i // 4]}],
    }


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_presets(tmp_path_factory.mktemp("presets"))


def test_sixteen_mixed_requests_batched_equal_each_alone(presets: Path) -> None:
    app = make_app(presets, batch_wait_ms=60)
    with serving(app) as url:
        alone = [_text(httpx.post(f"{url}/v1/chat/completions", json=body(i), timeout=60)) for i in range(16)]
        batches_before = app.state.steerlib.metrics.batch_size.collect()[0]

        async def together() -> list[str]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as c:
                rs = await asyncio.gather(*[c.post("/v1/chat/completions", json=body(i)) for i in range(16)])
            return [_text(r) for r in rs]

        batched = asyncio.run(together())
    assert batched == alone
    counts = {s.name: s.value for s in batches_before.samples}
    assert counts["steerlib_batch_size_count"] == 16  # served alone: one batch each
    total = {s.name: s.value for s in app.state.steerlib.metrics.batch_size.collect()[0].samples}
    assert total["steerlib_batch_size_count"] - 16 < 16  # the concurrent ones shared batches
    # 16 different (prompt, steering) pairs; steering changes answers, so equality is not vacuous.
    assert len(set(alone)) >= 10


def _text(r: httpx.Response) -> str:
    assert r.status_code == 200, r.text
    out: str = r.json()["choices"][0]["message"]["content"]
    return out
