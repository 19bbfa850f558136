"""Issue 17's proofs of concept, each answered with a 4xx naming its field or an error finish of its own row only:
sent concurrently with good requests (streaming and not) that must come back exactly as they do alone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from test_server_support import MODEL_NAME, D, make_app, make_presets, serving, words

CHAT: dict[str, Any] = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": words(10, 11)}],
    "max_tokens": 6,
    "temperature": 0,
}


def add(**kw: Any) -> dict[str, Any]:
    return {"interventions": [{"op": "add", "layer": 1, "vector": "push"} | kw]}


def sae_set(value: float) -> dict[str, Any]:
    return {"interventions": [{"op": "sae", "sae": "probe", "edits": [{"feature": 1, "mode": "set", "value": value}]}]}


POCS: dict[str, tuple[dict[str, Any], str]] = {
    "temperature 1e-39": (CHAT | {"temperature": 1e-39}, "temperature 1e-39 is too small to sample with"),
    "temperature 1e-38": (CHAT | {"temperature": 1e-38}, "use 0 for greedy decoding"),
    "seed 2**64": (CHAT | {"temperature": 1, "seed": 2**64}, "seed: Input should be less than 9223372036854775808"),
    "seed -2**70": (CHAT | {"temperature": 1, "seed": -(2**70)}, "seed: Input should be greater than or equal"),
    "positions 2**70": (CHAT | {"steering": add(apply={"positions": [2**70]})}, "apply.positions.0: Input should"),
    "window 2**70": (CHAT | {"steering": add(apply={"window": [2**70, None]})}, "positions are at most 2147483647"),
    "last 2**70": (CHAT | {"steering": add(apply={"last": 2**70})}, "apply.last: Input should be less than or equal"),
    "positions past the server": (CHAT | {"steering": add(apply={"positions": [5000]})}, "max_prompt_tokens"),
    "sae set 1e300": (CHAT | {"steering": sae_set(1e300)}, "edits.0.value: Input should be less than or equal"),
    "sae set 1e9": (CHAT | {"steering": sae_set(1e9)}, "exceeds 10000 (max_edit_value)"),
    "coefficient 1e300 sampling": (CHAT | {"temperature": 1, "steering": add(coefficient=1e300)}, "coefficient"),
    "coefficient 1e308 greedy": (CHAT | {"steering": add(coefficient=1e308)}, "coefficient: Input should be less"),
    "coefficient 1e5": (CHAT | {"steering": add(coefficient=1e5)}, "exceeds 10000 (max_coefficient)"),
    "layer [0]*20000": (CHAT | {"steering": add(layer=[0] * 20000)}, "layer list has 20000 entries; at most 1024"),
    "layer [0]*200": (CHAT | {"steering": add(layer=[0] * 200)}, "200 layers; at most 128"),
    "positions x300": (CHAT | {"steering": add(apply={"positions": list(range(300))})}, "max_selector_items"),
    "match x300": (CHAT | {"steering": add(apply={"match": [f"w{i}" for i in range(300)]})}, "max_selector_items"),
    "long stop": (CHAT | {"stop": "x" * 129}, "stop: a sequence of 129 characters; at most 128"),
    "batch cost": (CHAT | {"steering": add(layer=[0, 1, 2] * 40, apply={"positions": list(range(40))})}, "cost"),
}


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_presets(tmp_path_factory.mktemp("presets"))


@pytest.fixture(scope="module")
def client(presets: Path) -> Iterator[TestClient]:
    with TestClient(make_app(presets)) as c:
        yield c


@pytest.mark.parametrize("name", list(POCS))
def test_each_proof_of_concept_is_a_400_naming_its_field(client: TestClient, name: str) -> None:
    body, message = POCS[name]
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and message in err["message"], err


# A config that validates (inside steerlib's bounds and the raised server caps below) but overflows float32: 1e12 on
# a vector of 1e12 entries, then a relative add whose norm of that is inf. ``generated``: it fails after token 1.
OVERFLOW = [
    {"op": "add", "layer": 1, "vector": [1e12] * D, "coefficient": 1e12, "apply": {"tokens": "generated"}},
    {"op": "add", "layer": 1, "vector": "push", "relative": True, "apply": {"tokens": "generated"}},
]
GOOD = [
    CHAT | {"max_tokens": 8, "messages": [{"role": "user", "content": words(20 + i, 30, 40 + i)}]} for i in range(4)
]
GOOD[1] |= {"steering": ["push"]}
GOOD[2] |= {"temperature": 0.8, "seed": 7}
GOOD[3] |= {"steering": sae_set(6.0)}


async def _send(c: httpx.AsyncClient, body: dict[str, Any], stream: bool) -> tuple[int, str, str | None, Any]:
    """(status, text, finish reason, error) of a chat request, streamed or not."""
    if not stream:
        r = await c.post("/v1/chat/completions", json=body)
        j = r.json()
        if r.status_code != 200:
            return r.status_code, "", None, j["error"]
        return 200, j["choices"][0]["message"]["content"], j["choices"][0]["finish_reason"], None
    text, finish, error = "", None, None
    async with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                error = event["error"]
            for ch in event.get("choices", []):
                text += ch["delta"].get("content") or ""
                finish = ch["finish_reason"] or finish
    return r.status_code, text, finish, error


def test_poison_rows_finish_alone_and_their_neighbours_as_if_alone(presets: Path) -> None:
    """Every proof of concept, and rows whose logits overflow to NaN mid-generation, streamed and not, sent together
    with good requests: the good ones equal their solo runs, each poison gets its own 4xx or error finish."""
    app = make_app(presets, batch_wait_ms=150, max_coefficient=1e12, max_batch=32)  # lets OVERFLOW through
    pocs = {k: v for k, v in POCS.items() if "max_coefficient" not in v[1]}
    poisons = [(body, False) for body, _ in pocs.values()]
    overflow = CHAT | {"steering": {"interventions": OVERFLOW}}
    poisons += [(overflow, False), (overflow, True)]
    goods = [(g, i % 2 == 1) for i, g in enumerate(GOOD)] + [(g, i % 2 == 0) for i, g in enumerate(GOOD)]

    async def run(url: str) -> tuple[list[Any], list[Any], list[Any]]:
        async with httpx.AsyncClient(base_url=url, timeout=120) as c:
            solo = [await _send(c, body, stream) for body, stream in goods]
            together = await asyncio.gather(*[_send(c, b, s) for b, s in goods + poisons])
        return solo, together[: len(goods)], together[len(goods) :]

    with serving(app) as url:
        solo, good, bad = asyncio.run(run(url))
    assert good == solo
    assert all(s == 200 and finish == "length" and text for s, text, finish, _ in solo)
    for (status, _, _, error), (_, message) in zip(bad[: len(pocs)], pocs.values(), strict=True):
        assert status == 400 and message in error["message"]
    (s1, text1, fin1, err1), (s2, text2, fin2, err2) = bad[len(pocs) :]
    assert (s1, text1, fin1, err1["code"], err1["param"]) == (400, "", None, "non_finite", "steering")
    assert (s2, fin2, err2["code"]) == (200, "error", "non_finite") and len(text2.split()) == 1  # one token, then NaN
    assert err1["message"] == err2["message"] and "stopped after 1 token(s)" in err1["message"]
    batches = {s.name: s.value for s in app.state.steerlib.metrics.batch_size.collect()[0].samples}
    assert batches["steerlib_batch_size_count"] < len(solo) + 3  # the concurrent ones shared batches
