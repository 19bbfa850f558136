"""Per-key policy (an operator file: which presets, inline configs, ops, caps, preset writes; a 403 naming the rule,
before anything is queued) and the audit record (in the response on request, in the server's JSON-lines log)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from fastapi.testclient import TestClient
from test_server_support import MODEL_NAME, SAE_LAYER, make_app, make_presets, words
from tiny_models import tiny_model, word_tokenizer

from steerlib import SteeringConfig, steer
from steerlib.hf.recording import record
from steerlib.mlp_probe import load_mlp_probe

PROMPT = words(10, 11, 12)
CHAT: dict[str, Any] = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": PROMPT}],
    "max_tokens": 5,
    "temperature": 0,
}


def prompt_ids() -> list[int]:
    """The prompt's token ids as the server renders them."""
    tok = word_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


N_PROMPT = len(prompt_ids())
POLICY = {
    "keys": [
        {"name": "app", "key_sha256": hashlib.sha256(b"app-key").hexdigest(), "presets": ["push"], "inline": False,
         "skip_defaults": False},
        {"name": "research", "key": "research-key", "ops": ["add", "refuse"], "max_coefficient": 3,
         "max_edit_value": 5, "preset_writes": True},
    ]
}  # fmt: skip


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, Path]]:
    tmp = tmp_path_factory.mktemp("policy")
    presets = make_presets(tmp / "presets")
    (tmp / "keys.yaml").write_text(yaml.safe_dump(POLICY))
    app = make_app(
        presets,
        api_key="admin-key",
        key_policy=tmp / "keys.yaml",
        default_presets=["erase"],
        audit_log=tmp / "audit.jsonl",
        allow_preset_writes=True,
    )
    with TestClient(app) as c:
        yield c, tmp


def add(coefficient: float = 1.0, **kw: Any) -> dict[str, Any]:
    return {"op": "add", "layer": 1, "vector": "push", "coefficient": coefficient} | kw


@pytest.mark.parametrize(
    ("key", "steering", "rule"),
    [
        ("app-key", ["erase", "sae_edit"], "key 'app' may not use preset 'sae_edit' (rule presets: push)"),
        ("app-key", [], "key 'app' may not leave out the default presets ['erase'] (rule skip_defaults: false)"),
        ("app-key", ["push"], "(rule skip_defaults: false)"),
        ("app-key", {"presets": ["erase"], "interventions": [add()]}, "send inline interventions (rule inline: false)"),
        ("research-key", {"interventions": [{"op": "replace", "sae": "probe"}]}, "use op 'replace' (interventions[0])"),
        (
            "research-key",
            {"interventions": [add(4.0)]},
            "use coefficient 4 (interventions[0]) (rule max_coefficient: 3)",
        ),
    ],
)
def test_a_key_is_refused_what_its_rules_forbid(
    served: tuple[TestClient, Path], key: str, steering: Any, rule: str
) -> None:
    c, tmp = served
    lines = (tmp / "audit.jsonl").read_text().count("\n") if (tmp / "audit.jsonl").exists() else 0
    r = c.post("/v1/chat/completions", json=CHAT | {"steering": steering}, headers=auth(key))
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "forbidden_by_policy" and rule in r.json()["error"]["message"]
    after = (tmp / "audit.jsonl").read_text().count("\n") if (tmp / "audit.jsonl").exists() else 0
    assert after == lines  # refused before it was queued


def test_a_key_may_do_what_its_rules_allow(served: tuple[TestClient, Path]) -> None:
    c, _ = served
    ok = [
        ("app-key", None),
        ("app-key", ["erase", "push"]),
        ("research-key", []),
        ("research-key", {"interventions": [add(3.0)]}),
        ("admin-key", {"interventions": [{"op": "replace", "sae": "probe"}]}),
    ]
    for key, steering in ok:
        body = CHAT if steering is None else CHAT | {"steering": steering}
        assert c.post("/v1/chat/completions", json=body, headers=auth(key)).status_code == 200, (key, steering)
    for key in ("", "wrong", "app-key2", "admin"):
        assert c.post("/v1/chat/completions", json=CHAT, headers=auth(key)).status_code == 401


def test_preset_writes_follow_the_key(served: tuple[TestClient, Path]) -> None:
    c, tmp = served
    body = {"name": "mine", "description": "d", "steering": {"interventions": [add(2.0)]}}
    r = c.post("/v1/steering/presets", json=body, headers=auth("app-key"))
    assert r.status_code == 403 and "(rule preset_writes: false)" in r.json()["error"]["message"]
    assert c.post("/v1/steering/presets", json=body, headers=auth("research-key")).status_code == 200
    r = c.post("/v1/steering/presets", json=body | {"overwrite": True}, headers=auth("research-key"))
    assert r.status_code == 403 and "(rule preset_overwrite: false)" in r.json()["error"]["message"]
    assert (tmp / "presets" / "mine.yaml").exists()


def test_the_audit_record_says_what_each_op_touched(served: tuple[TestClient, Path]) -> None:
    """Exact token counts: a prompt-only op touches the prompt, a generated-only op the generated tokens fed back
    (max_tokens - 1), listed positions one per layer, a gate that did not fire none; gate scores as the probe gives."""
    c, tmp = served
    gate = {"probe": "gate", "scope": "prompt", "aggregate": "mean"}
    steering = {
        "presets": ["erase"],
        "interventions": [
            add(apply={"tokens": "prompt"}),
            add(layer=[0, 2], apply={"positions": [0, 1]}),
            add(apply={"tokens": "generated"}),
            add(apply={"when": gate | {"above": 1e6}}),
            {"op": "refuse", "layer": SAE_LAYER, "name": "never", "apply": {"when": gate | {"below": -1e6}}},
        ],
    }
    body = CHAT | {"steering": steering, "steering_audit": True}
    r = c.post("/v1/chat/completions", json=body, headers=auth("research-key"))
    assert r.status_code == 200, r.text
    audit = r.json()["steering_audit"]
    assert (audit["presets"], audit["detector"]) == (["erase"], None)
    ivs = audit["interventions"]
    assert [(iv["index"], iv["op"], iv["source"]) for iv in ivs] == [
        (0, "ablate", "preset:erase"), (1, "add", "inline"), (2, "add", "inline"), (3, "add", "inline"),
        (4, "add", "inline"), (5, "refuse", "inline"),
    ]  # fmt: skip
    n = N_PROMPT + 5 - 1
    assert [(x["layer"], x["tokens_touched"]) for x in ivs[0]["layers"]] == [(0, n), (1, n), (2, n)]
    assert [x["tokens_touched"] for x in ivs[1]["layers"]] == [N_PROMPT]
    assert [(x["layer"], x["tokens_touched"]) for x in ivs[2]["layers"]] == [(0, 2), (2, 2)]
    assert [x["tokens_touched"] for x in ivs[3]["layers"]] == [5 - 1]
    gated, refuse = ivs[4]["layers"][0], ivs[5]["layers"][0]
    assert (gated["tokens_selected"], gated["tokens_touched"], gated["gate"]["fired"]) == (n, 0, False)
    assert (refuse["tokens_touched"], refuse["gate"]["fired"]) == (0, False)
    expected = _probe_score(tmp / "presets")
    assert gated["gate"]["score"] == pytest.approx(expected, rel=1e-5)
    assert refuse["gate"]["score"] == pytest.approx(expected, rel=1e-5)  # same probe, same layer, same prompt


def _probe_score(presets: Path) -> float:
    """The gate's score computed apart: the probe on the mean of layer 1's output over the prompt, with every op
    that reaches it applied (the erase preset's ablation, the prompt-only add, the positions add at layer 0)."""
    model = tiny_model("llama", 3)

    push = str(presets / "vectors" / "push.safetensors")
    before = [
        {"op": "ablate", "layer": "all", "vector": push},
        add(apply={"tokens": "prompt"}) | {"vector": push},
        add(layer=[0, 2], apply={"positions": [0, 1]}) | {"vector": push},
    ]
    cfg = SteeringConfig.model_validate({"interventions": before})
    with torch.no_grad(), steer(model, cfg), record(model, ["blocks.1.hook_resid_post"]) as rec:
        model(torch.tensor([prompt_ids()]))
    acts = rec["blocks.1.hook_resid_post"].reshape(-1, 64).float()  # every prompt token
    probe = load_mlp_probe(presets / "probes" / "gate.safetensors")
    return float(probe.scores(acts.mean(0, keepdim=True))[0])


def test_the_audit_log_has_a_line_per_request_and_no_text(served: tuple[TestClient, Path]) -> None:
    c, tmp = served
    before = (tmp / "audit.jsonl").read_text().splitlines() if (tmp / "audit.jsonl").exists() else []
    c.post("/v1/chat/completions", json=CHAT | {"steering": []}, headers=auth("research-key"))
    with c.stream("POST", "/v1/chat/completions", json=CHAT | {"stream": True}, headers=auth("app-key")) as s:
        list(s.iter_lines())
    lines = [json.loads(x) for x in (tmp / "audit.jsonl").read_text().splitlines()[len(before) :]]
    assert [(x["key"], x["steered"], x["presets"], x["finish_reason"]) for x in lines] == [
        ("research", False, [], "length"),
        ("app", True, ["erase"], "length"),
    ]
    assert lines[1]["interventions"][0]["op"] == "ablate" and "prompt" not in lines[1]
    assert PROMPT not in (tmp / "audit.jsonl").read_text()


def test_the_audit_log_keeps_text_only_when_asked(tmp_path: Path) -> None:
    presets = make_presets(tmp_path / "presets")
    with TestClient(make_app(presets, audit_log=tmp_path / "a.jsonl", audit_text=True)) as c:
        out = c.post("/v1/chat/completions", json=CHAT | {"steering": ["push"]}).json()
    line = json.loads((tmp_path / "a.jsonl").read_text())
    assert PROMPT in line["prompt"] and line["response"] == out["choices"][0]["message"]["content"]
    assert line["key"] == "default" and "steering_audit" not in out  # not asked for in the response


def test_a_streamed_answer_carries_its_audit_in_the_final_chunk(served: tuple[TestClient, Path]) -> None:
    c, _ = served
    body = CHAT | {"stream": True, "steering_audit": True, "steering": ["erase", "push"]}
    with c.stream("POST", "/v1/chat/completions", json=body, headers=auth("app-key")) as s:
        chunks = [json.loads(x[6:]) for x in s.iter_lines() if x.startswith("data: {")]
    final = [ch for ch in chunks if "steering_audit" in ch]
    assert len(final) == 1 and final[0]["choices"][0]["finish_reason"] == "length"
    assert [iv["source"] for iv in final[0]["steering_audit"]["interventions"]] == ["preset:erase", "preset:push"]


def test_a_policy_file_with_a_mistake_stops_the_server(tmp_path: Path) -> None:
    presets = make_presets(tmp_path / "presets")
    for keys, message in (
        ([{"name": "a"}], "give exactly one of key and key_sha256"),
        ([{"name": "a", "key": "k"}, {"name": "b", "key": "k"}], "every key needs its own name"),
        ([{"name": "a", "key": "k", "op": ["add"]}], "Extra inputs are not permitted"),
    ):
        (tmp_path / "k.yaml").write_text(yaml.safe_dump({"keys": keys}))
        with pytest.raises(ValueError, match=message):
            make_app(presets, key_policy=tmp_path / "k.yaml")
