"""Bad input is a 4xx in OpenAI's error shape, never a 5xx and never an unsteered answer; auth; limits; path
confinement of preset, vector and SAE names."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from test_server_support import MODEL_NAME, D, make_app, make_presets, words

from servers.registry import PresetError, PresetRegistry

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": words(10, 11)}], "max_tokens": 2}


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_presets(tmp_path_factory.mktemp("presets"))


@pytest.fixture(scope="module")
def client(presets: Path) -> Iterator[TestClient]:
    with TestClient(make_app(presets, max_tokens_limit=32, max_prompt_tokens=20)) as c:
        yield c


def add(vector: Any, **kw: Any) -> dict[str, Any]:
    return {"interventions": [{"op": "add", "layer": 1, "vector": vector, **kw}]}


BAD_CHAT: dict[str, dict[str, Any]] = {
    "unknown field": CHAT | {"temprature": 0.5},
    "misspelt steering": CHAT | {"steerin": ["push"]},
    "no messages": {"model": MODEL_NAME, "messages": []},
    "message without role": CHAT | {"messages": [{"content": "hi"}]},
    "image content": CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
    "tool role": CHAT | {"messages": [{"role": "tool", "content": "x"}]},
    "n=2": CHAT | {"n": 2},
    "top_logprobs over the limit": CHAT | {"logprobs": True, "top_logprobs": 21},
    "tools": CHAT | {"tools": [{"type": "function", "function": {"name": "f"}}]},
    "penalty out of range": CHAT | {"presence_penalty": 2.5},
    "temperature range": CHAT | {"temperature": 3},
    "top_p zero": CHAT | {"top_p": 0},
    "max_tokens zero": CHAT | {"max_tokens": 0},
    "max_tokens over limit": CHAT | {"max_tokens": 33},
    "prompt too long": CHAT | {"messages": [{"role": "user", "content": words(*range(10, 40))}]},
    "five stops": CHAT | {"stop": ["a", "b", "c", "d", "e"]},
    "features with stream": CHAT | {"stream": True, "return_features": {"sae": "probe"}},
    "features unknown sae": CHAT | {"return_features": {"sae": "nope"}},
    "steering not a list": CHAT | {"steering": "push"},
    "unknown preset": CHAT | {"steering": ["nope"]},
    "preset path": CHAT | {"steering": ["../../etc/passwd"]},
    "vector path": CHAT | {"steering": add("/etc/passwd")},
    "preset vector path": CHAT | {"steering": add({"preset_vector": "../../../etc/passwd"})},
    "unknown preset vector": CHAT | {"steering": add({"preset_vector": "nope"})},
    "unknown probe": CHAT | {"steering": add([1.0] * D, apply={"when": {"probe": "nope", "above": 0}})},
    "probe path": CHAT | {"steering": add([1.0] * D, apply={"when": {"probe": "../probes/gate", "above": 0}})},
    "sae path": CHAT | {"steering": {"interventions": [{"op": "sae", "layer": 1, "sae": "/etc", "edits": []}]}},
    "sae dotdot": CHAT | {"steering": {"interventions": [{"op": "replace", "layer": 1, "sae": "../saes/probe"}]}},
    "layer out of range": CHAT | {"steering": {"interventions": [{"op": "ablate", "layer": 3, "vector": [1.0] * D}]}},
    "negative layer": CHAT
    | {"steering": add([1.0] * D) | {"interventions": [{"op": "add", "layer": -1, "vector": [1.0] * D}]}},
    "wrong width": CHAT | {"steering": add([1.0] * (D - 1))},
    "zero ablation": CHAT | {"steering": {"interventions": [{"op": "ablate", "layer": 1, "vector": [0.0] * D}]}},
    "feature out of range": CHAT
    | {
        "steering": {
            "interventions": [
                {"op": "sae", "layer": 1, "sae": "probe", "edits": [{"feature": 16, "mode": "set", "value": 1.0}]}
            ]
        }
    },
    "when feature out of range": CHAT
    | {
        "steering": {
            "interventions": [{"op": "sae", "layer": 1, "sae": "probe", "apply": {"when": {"feature": 99, "above": 0}}}]
        }
    },
    "bad site": CHAT | {"steering": add([1.0] * D, site="resid_middle")},
    "code in steering": CHAT | {"steering": {"interventions": [{"op": "python", "layer": 1, "code": "import os"}]}},
    "unknown inline field": CHAT | {"steering": add([1.0] * D, hook="x")},
}


@pytest.mark.parametrize("name", list(BAD_CHAT))
def test_bad_chat_requests_are_4xx_in_openai_shape(client: TestClient, name: str) -> None:
    r = client.post("/v1/chat/completions", json=BAD_CHAT[name])
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]


ONES_63 = ", ".join(["1.0"] * (D - 1))


@pytest.mark.parametrize(
    "fragment",
    [
        '"steering": {"interventions": [{"op": "add", "layer": 1, "vector": [' + ONES_63 + ", NaN]}]}",
        '"steering": {"interventions": [{"op": "add", "layer": 1, "vector": [' + ONES_63 + ", 1.0], "
        '"coefficient": Infinity}]}',
        '"steering": {"interventions": [{"op": "sae", "layer": 1, "sae": "probe", '
        '"edits": [{"feature": 1, "mode": "set", "value": NaN}]}]}',
        '"temperature": NaN',
        '"top_p": -Infinity',
    ],
)
def test_non_finite_numbers_are_a_400(client: TestClient, fragment: str) -> None:
    """Python's JSON parser accepts NaN and Infinity, so the server must catch them itself."""
    body = (
        f'{{"model": "{MODEL_NAME}", "messages": [{{"role": "user", "content": "w10"}}], "max_tokens": 2, {fragment}}}'
    )
    r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"model": MODEL_NAME, "prompt": ["a", "b"]}),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": [5, 999]}),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "w10", "echo": True, "stream": True}),
        ("/v1/completions", {"model": MODEL_NAME, "prompt": "w10", "best_of": 3}),
        ("/v1/completions", {"model": MODEL_NAME}),
        ("/v1/completions", {"model": "gpt-4", "prompt": "w10"}),
        ("/v1/chat/completions", "not json"),
        ("/v1/chat/completions", [1, 2]),
        ("/v1/features/inspect", {"sae": "nope", "prompt": "w10"}),
        ("/v1/features/inspect", {"sae": "../saes/probe", "prompt": "w10"}),
        ("/v1/features/inspect", {"sae": "probe", "prompt": "w10", "response": "w11", "generate_tokens": 2}),
        ("/v1/features/inspect", {"sae": "probe", "prompt": ""}),
        ("/v1/features/inspect", {"sae": "probe", "prompt": "w10", "steering": ["nope"]}),
    ],
)
def test_other_bad_requests_are_4xx(client: TestClient, path: str, body: Any) -> None:
    r = client.post(path, json=body) if not isinstance(body, str) else client.post(path, content=body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_an_inline_op_gated_by_a_preset_probe_steers_only_where_it_fires(client: TestClient) -> None:
    """``when: {probe: NAME}`` reads probes/NAME.safetensors; a gate that always fires is the plain op, one that
    never fires leaves the answer alone, and an unknown name is a 400 naming the probes there are."""
    body = CHAT | {"max_tokens": 6, "temperature": 0}

    def answer(steering: Any) -> str:
        r = client.post("/v1/chat/completions", json=body | {"steering": steering})
        assert r.status_code == 200, r.text
        return str(r.json()["choices"][0]["message"]["content"])

    def gated(above: float) -> dict[str, Any]:
        when = {"probe": "gate", "above": above, "scope": "prompt", "aggregate": "mean"}
        return add({"preset_vector": "push"}, coefficient=4.0, apply={"when": when})

    pushed, plain = answer(add({"preset_vector": "push"}, coefficient=4.0)), answer([])
    assert pushed != plain
    assert (answer(gated(-1e6)), answer(gated(1e6))) == (pushed, plain)
    r = client.post(
        "/v1/chat/completions", json=body | {"steering": add([1.0] * D, apply={"when": {"probe": "x", "above": 0}})}
    )
    assert r.status_code == 400 and "unknown probe 'x'; available: gate" in r.json()["error"]["message"]


def test_an_inline_refuse_op_answers_with_its_message_where_its_probe_fires(client: TestClient) -> None:
    body = CHAT | {"max_tokens": 8, "temperature": 0}

    def refuse(above: float) -> dict[str, Any]:
        when = {"probe": "gate", "above": above, "scope": "prompt", "aggregate": "mean"}
        return {"interventions": [{"op": "refuse", "layer": 1, "message": "w100 w101", "name": "mine",
                                   "apply": {"when": when}}]}  # fmt: skip

    fired = client.post("/v1/chat/completions", json=body | {"steering": refuse(-1e6)}).json()
    assert fired["choices"][0]["message"]["content"] == "w100 w101"
    assert fired["steering_refusal"] == {"detector": "mine"}
    passed = client.post("/v1/chat/completions", json=body | {"steering": refuse(1e6)}).json()
    plain = client.post("/v1/chat/completions", json=body | {"steering": []}).json()
    assert "steering_refusal" not in passed
    assert passed["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    no_when = {"interventions": [{"op": "refuse", "layer": 1}]}
    r = client.post("/v1/chat/completions", json=body | {"steering": no_when})
    assert r.status_code == 400 and "op refuse needs apply.when" in r.json()["error"]["message"]


def test_a_good_request_passes_the_same_client(client: TestClient) -> None:
    body = CHAT | {"temperature": 0, "steering": add({"preset_vector": "push"})}  # greedy: never an early EOS here
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_api_key_is_required_when_set(presets: Path) -> None:
    with TestClient(make_app(presets, api_key="s3cret")) as c:
        assert c.post("/v1/chat/completions", json=CHAT).status_code == 401
        wrong = c.get("/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        ok = c.post("/v1/chat/completions", json=CHAT, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        assert c.get("/health").status_code == 200  # health stays open for load balancers


def test_default_presets_apply_unless_the_request_opts_out(presets: Path) -> None:
    body = CHAT | {"max_tokens": 6, "temperature": 0}
    with TestClient(make_app(presets)) as plain_app, TestClient(make_app(presets, default_presets=["push"])) as c:
        plain = plain_app.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        pushed = plain_app.post("/v1/chat/completions", json=body | {"steering": ["push"]}).json()
        default = c.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
        opted_out = c.post("/v1/chat/completions", json=body | {"steering": []}).json()["choices"][0]["message"]
    assert default == pushed["choices"][0]["message"]["content"] != plain
    assert opted_out["content"] == plain


def test_registry_confines_every_name(presets: Path, tmp_path: Path) -> None:
    reg = PresetRegistry(presets)
    for bad in ["../push", "..", "/etc/passwd", "a/b", ""]:
        with pytest.raises(PresetError):
            reg.vector(bad)
        with pytest.raises(PresetError):
            reg.sae(bad)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(b"x")
    (presets / "vectors" / "link.safetensors").symlink_to(outside)
    try:
        with pytest.raises(PresetError, match="outside the presets folder"):
            reg.vector("link")
    finally:
        (presets / "vectors" / "link.safetensors").unlink()


@pytest.mark.parametrize(
    "text",
    [
        "description: reads elsewhere\ninterventions:\n  - {op: add, layer: 1, vector: ../elsewhere.safetensors}\n",
        "description: reads elsewhere\ninterventions:\n  - {op: refuse, layer: 1, apply: {when: {probe: "
        "../probe.safetensors, above: 0, scope: prompt}}}\n",
        "description: [unclosed\n",
        "interventions: []\n",
        "description: typo\ninterventions:\n  - {op: add, layr: 1, vector: vectors/push.safetensors}\n",
    ],
)
def test_a_preset_file_that_cannot_be_served_is_skipped_with_an_error(
    tmp_path: Path, text: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_presets(tmp_path)
    (tmp_path / "evil.yaml").write_text(text)
    reg = PresetRegistry(tmp_path)
    assert reg.names == ["erase", "push", "sae_edit"]
    assert [r.levelname for r in caplog.records if "skipping preset file evil.yaml" in r.getMessage()] == ["ERROR"]
    with pytest.raises(PresetError, match="unknown preset 'evil'"):
        reg.get("evil")
    with pytest.raises(PresetError, match="unknown preset 'evil'"):
        make_app(tmp_path, default_presets=["evil"])  # a default that was skipped still stops the server


def test_inline_configs_are_steerlib_configs(client: TestClient) -> None:
    """Inline interventions are steerlib's models: an SAE op without a layer runs where its SAE was trained (as a
    preset's does), elsewhere it needs any_site, and a vector may be named plainly."""
    body = CHAT | {"max_tokens": 6, "temperature": 0}

    def answer(steering: Any) -> Any:
        return client.post("/v1/chat/completions", json=body | {"steering": steering}).json()

    def text(steering: Any) -> str:
        return str(answer(steering)["choices"][0]["message"]["content"])

    edit = {"op": "sae", "sae": "probe", "edits": [{"feature": 3, "mode": "set", "value": 6.0}]}
    own = text({"interventions": [edit]})
    assert own == text({"interventions": [edit | {"layer": 1}]}) == text(["sae_edit"]) != text([])
    elsewhere = answer({"interventions": [edit | {"layer": 2}]})["error"]["message"]
    assert "this SAE was trained at layer 1, site resid_post" in elsewhere and "any_site: true" in elsewhere
    assert "choices" in answer({"interventions": [edit | {"layer": 2, "any_site": True}]})
    named = {"op": "add", "layer": 1, "vector": "push", "coefficient": 2.0}
    assert text({"interventions": [named]}) == text(["push"]) != text([])
