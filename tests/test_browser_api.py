"""The feature browser's JSON API: search ranking on planted data, stored feature data, alignment with a planted
vector and with a prompt's activation, saving presets, and 4xx on bad input."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
import yaml
from test_browser_support import PLANTED, F, browser_app, explanation, make_sae, write_index
from test_server_support import MODEL_NAME, SAE_LAYER, serving

from servers.browser.index import FeatureIndexError, load_index
from servers.browser.presets import BrowserRegistry, _restore, _write_atomic
from servers.settings import ServerSettings, load_settings
from steerlib.extract.activations import prompt_ids


def record(
    f: int, freq: float, contexts: list[tuple[list[str], list[float]]] | None = None, vocab: list[str] | None = None
) -> dict[str, Any]:
    return {
        "feature": f,
        "frequency": freq,
        "mean_activation": 0.1,
        "max_activation": 4.0,
        "histogram": {"edges": [0.1, 1.0, 10.0], "counts": [3, 1]},
        "top_contexts": [{"tokens": t, "activations": a} for t, a in contexts or []],
        "vocab_top": [[v, 1.0] for v in vocab or []],
        "vocab_bottom": [["zz", -1.0]],
    }


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, Any, Any, Path]]:
    tmp = tmp_path_factory.mktemp("browser")
    app, model, tokenizer = browser_app(tmp, allow_preset_overwrite=True, default_presets=["erase"])
    with serving(app) as base, httpx.Client(base_url=base, timeout=60) as client:
        yield client, model, tokenizer, tmp


def chat(client: httpx.Client, steering: Any, prompt: str = "w10 w11 w12") -> str:
    body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompt}], "max_tokens": 6}
    r = client.post("/v1/chat/completions", json=body | {"temperature": 0, "steering": steering})
    assert r.status_code == 200, r.text
    text: str = r.json()["choices"][0]["message"]["content"]
    return text


def sae_edit(value: float, mode: str = "set", feature: int = PLANTED) -> dict[str, Any]:
    op = {"op": "sae", "layer": SAE_LAYER, "site": "resid_post", "sae": "tiny"}
    return {"interventions": [op | {"edits": [{"feature": feature, "mode": mode, "value": value}]}]}


def test_search_ranks_explanation_then_context_strength_then_vocab(tmp_path: Path) -> None:
    make_sae(tmp_path / "sae")
    rows = [
        record(0, 0.5),
        record(2, 0.01),
        record(7, 0.2, [(["the", " Cat", "sat"], [0.0, 3.0, 0.5])]),
        record(9, 0.3, vocab=[" cat", "dog"]),
        record(11, 0.1, [(["a", "cat"], [0.2, 4.0])], vocab=["cat"]),
        record(12, 0.9, [(["category"], [4.0])]),
    ]
    index = load_index(write_index(tmp_path / "planted", tmp_path / "sae", rows, [explanation(2, "Mentions of cats")]))
    hits = index.search(" CAT ", 10)
    assert [h.feature for h in hits] == [2, 11, 7, 9]
    assert [h.score for h in hits] == [2.0, 1.5, 0.75, 0.5]
    assert hits[1].matched == ["context", "vocab"]
    assert [h.feature for h in index.search("", 3)] == [12, 0, 9]  # by frequency
    assert index.search("cat", 2) == hits[:2]
    assert index.search("nothing", 10) == []


def test_index_errors_name_the_file_and_field(tmp_path: Path) -> None:
    make_sae(tmp_path / "sae")
    folder = write_index(tmp_path / "bad", tmp_path / "sae", [record(0, 0.1) | {"extra": 1}], [])
    with pytest.raises(FeatureIndexError, match=r"features.jsonl line 1: extra: Extra inputs"):
        load_index(folder)
    write_index(folder, tmp_path / "sae", [record(F, 0.1)], [])
    with pytest.raises(FeatureIndexError, match=f"feature {F} out of range for d_sae={F}"):
        load_index(folder)
    write_index(folder, tmp_path / "missing", [record(0, 0.1)], [])
    with pytest.raises(FeatureIndexError, match=r"SAE .*missing.* not found"):
        load_index(folder)


def test_features_setting_from_a_flag_string_and_yaml(tmp_path: Path) -> None:
    assert load_settings({"features": "a:b"}).features == [Path("a"), Path("b")]
    (tmp_path / "s.yaml").write_text("features: [x, y]\nallow_preset_writes: true\n")
    s = load_settings({}, tmp_path / "s.yaml")
    assert (s.features, s.allow_preset_writes) == ([Path("x"), Path("y")], True)
    assert ServerSettings().allow_preset_writes is False


def test_indexes_search_and_feature_routes(server: tuple[httpx.Client, Any, Any, Path]) -> None:
    client = server[0]
    ix = client.get("/v1/features/indexes").json()["data"]
    assert [(i["name"], i["sae"], i["layer"], i["site"], i["d_sae"], i["n_explained"]) for i in ix] == [
        ("tiny", "tiny", SAE_LAYER, "resid_post", F, 1)
    ]
    hits = client.get("/v1/features/tiny/search", params={"q": "weather"}).json()["data"]
    assert [(h["feature"], h["explanation"], h["matched"]) for h in hits] == [
        (PLANTED, "planted weather feature", ["explanation"])
    ]
    d = client.get(f"/v1/features/tiny/{PLANTED}").json()
    assert d["feature"] == PLANTED and d["explanation"]["explanation"] == "planted weather feature"
    assert len(d["histogram"]["edges"]) == len(d["histogram"]["counts"]) + 1 == 25
    assert len(d["vocab_top"]) == 5 and all(len(c["tokens"]) == len(c["activations"]) for c in d["top_contexts"])
    assert client.get("/browser").text.startswith("<!doctype html>")
    assert client.get("/browser/static/browser.js").status_code == 200


def test_align_with_a_planted_vector_finds_its_feature(server: tuple[httpx.Client, Any, Any, Path]) -> None:
    r = server[0].post("/v1/features/tiny/align", json={"vector": "planted", "k": 3})
    assert r.status_code == 200, r.text
    top = r.json()["data"]
    assert top[0]["feature"] == PLANTED and top[0]["explanation"] == "planted weather feature"
    assert top[0]["cosine"] == pytest.approx(1.0, abs=1e-6)
    assert top[1]["cosine"] < 0.9


def test_align_with_a_prompt_uses_its_last_token_activation(server: tuple[httpx.Client, Any, Any, Path]) -> None:
    client, model, tokenizer, tmp = server
    r = client.post("/v1/features/tiny/align", json={"prompt": "w20 w21 w22", "k": 4})
    assert r.status_code == 200, r.text
    got = r.json()["data"]
    ids = torch.tensor([prompt_ids(tokenizer, "w20 w21 w22", chat=True)])
    with torch.no_grad():
        h_D = model(input_ids=ids, output_hidden_states=True).hidden_states[SAE_LAYER + 1][0, -1]  # resid_post
        sae = make_sae(tmp / "again")  # same seed: the same SAE
        cos_F = torch.nn.functional.cosine_similarity(sae.W_dec, h_D[None], dim=-1)
        z_F = sae.encode(h_D[None])[0]
    want = cos_F.topk(4)
    assert [g["feature"] for g in got] == want.indices.tolist()
    assert [g["cosine"] for g in got] == pytest.approx(want.values.tolist(), abs=1e-5)
    assert [g["activation"] for g in got] == pytest.approx(z_F[want.indices].tolist(), abs=1e-5)


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("get", "/v1/features/nope/search?q=a", None, 404, "unknown feature index 'nope'; served indexes: tiny"),
        ("get", f"/v1/features/tiny/{F}", None, 404, f"feature {F} out of range: index 'tiny' has {F} latents"),
        ("get", "/v1/features/tiny/-1", None, 404, "feature -1 out of range"),
        ("get", "/v1/features/tiny/x", None, 400, "feature: Input should be a valid integer"),
        ("get", "/v1/features/tiny/search?limit=0", None, 400, "limit: Input should be greater than or equal to 1"),
        ("post", "/v1/features/tiny/align", {}, 400, "give exactly one of vector"),
        ("post", "/v1/features/tiny/align", {"vector": "planted", "prompt": "a"}, 400, "give exactly one of vector"),
        ("post", "/v1/features/tiny/align", {"vector": "gone"}, 400, "unknown vector 'gone'; available: planted, push"),
        ("post", "/v1/features/tiny/align", {"vector": "../x"}, 400, "invalid vector name '../x'"),
        ("post", "/v1/features/tiny/align", {"vector": "planted", "top": 3}, 400, "top: Extra inputs"),
        ("post", "/v1/features/tiny/align", {"prompt": "a", "k": 0}, 400, "k: Input should be greater than"),
    ],
)
def test_bad_browser_requests_are_4xx_with_a_message(
    server: tuple[httpx.Client, Any, Any, Path], method: str, path: str, body: Any, status: int, message: str
) -> None:
    client = server[0]
    r = client.get(path) if method == "get" else client.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_the_index_sae_steers_by_the_index_name(server: tuple[httpx.Client, Any, Any, Path]) -> None:
    client = server[0]
    assert "tiny" in client.get("/v1/steering/presets").json()["saes"]
    plain, steered = chat(client, []), chat(client, sae_edit(40.0))
    assert plain != steered
    assert chat(client, sae_edit(0.0, mode="add")) == plain  # adding 0 keeps the SAE's error term: no change
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "w9"}],
            "max_tokens": 2,
            "steering": sae_edit(1.0, feature=F),
        },
    )
    assert r.status_code == 400, r.text
    assert f"feature: {F} out of range: the SAE has {F} latents" in r.json()["error"]["message"]


def test_save_a_preset_then_list_and_use_it(server: tuple[httpx.Client, Any, Any, Path]) -> None:
    client, tmp = server[0], server[3]
    body = {"name": "tiny_f5", "description": "clamp 5 at 40", "steering": sae_edit(40.0)}
    r = client.post("/v1/steering/presets", json=body)
    assert r.status_code == 200, r.text
    listed = {p["name"]: p for p in client.get("/v1/steering/presets").json()["data"]}
    assert listed["tiny_f5"]["description"] == "clamp 5 at 40"
    assert chat(client, ["tiny_f5"]) == chat(client, sae_edit(40.0))
    saved = yaml.safe_load((tmp / "presets" / "tiny_f5.yaml").read_text())
    assert saved["interventions"] == [
        {
            "op": "sae",
            "layer": SAE_LAYER,
            "site": "resid_post",  # where the SAE runs, recorded (an SAE op's default is the SAE's own site)
            "sae": "tiny",  # the index's name, not its SAE's path: the preset travels with the index
            "edits": [{"feature": PLANTED, "mode": "set", "value": 40.0}],
        }
    ]
    moved = BrowserRegistry(tmp / "presets", {"tiny": tmp / "sae"})  # another server serving the same index
    assert moved.get("tiny_f5").interventions[0].sae == str((tmp / "sae").resolve())  # type: ignore[union-attr]
    again = client.post("/v1/steering/presets", json=body | {"description": "other"})
    assert again.status_code == 409 and "preset 'tiny_f5' exists" in again.json()["error"]["message"]
    probe = {"interventions": [{"op": "sae", "layer": SAE_LAYER, "sae": "probe", "edits": []}]}
    r = client.post("/v1/steering/presets", json=body | {"overwrite": True, "steering": probe})
    assert r.status_code == 200, r.text
    assert yaml.safe_load((tmp / "presets" / "tiny_f5.yaml").read_text())["interventions"][0]["sae"] == "saes/probe"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"name": "../evil"}, 400, "invalid preset name '../evil'"),
        ({"name": "a/b"}, 400, "invalid preset name 'a/b'"),
        ({"name": "ok\n"}, 400, "invalid preset name 'ok\\n'"),
        ({"name": "push"}, 409, "preset 'push' exists (push.yaml)"),
        ({"steering": {"interventions": []}}, 400, "nothing to save"),
        ({"steering": {"presets": ["nope"]}}, 400, "unknown preset 'nope'"),
        ({"description": ""}, 400, "description: String should have at least 1 character"),
        ({"path": "/tmp/x"}, 400, "path: Extra inputs are not permitted"),
    ],
)
def test_bad_preset_saves_are_refused(
    server: tuple[httpx.Client, Any, Any, Path], body: dict[str, Any], status: int, message: str
) -> None:
    client, tmp = server[0], server[3]
    before = sorted(p.name for p in (tmp / "presets").iterdir())
    full = {"name": "ok_name", "description": "d", "steering": sae_edit(1.0)} | body
    r = client.post("/v1/steering/presets", json=full)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]
    assert sorted(p.name for p in (tmp / "presets").iterdir()) == before


def test_overwrites_need_their_own_setting_and_never_touch_default_presets(
    server: tuple[httpx.Client, Any, Any, Path], tmp_path: Path
) -> None:
    client, tmp = server[0], server[3]
    before = (tmp / "presets" / "erase.yaml").read_bytes()
    body = {"name": "erase", "description": "d", "steering": sae_edit(1.0), "overwrite": True}
    r = client.post("/v1/steering/presets", json=body)
    assert r.status_code == 403 and "'erase' is a default preset of this server" in r.json()["error"]["message"]
    assert (tmp / "presets" / "erase.yaml").read_bytes() == before
    app, _, _ = browser_app(tmp_path)  # writes allowed, overwrites not
    with serving(app) as base, httpx.Client(base_url=base) as other:
        r = other.post("/v1/steering/presets", json=body | {"name": "push"})
        assert r.status_code == 403 and "--allow-preset-overwrite" in r.json()["error"]["message"]
        assert other.post("/v1/steering/presets", json=body | {"name": "fresh", "overwrite": False}).status_code == 200
    assert (tmp_path / "presets" / "push.yaml").read_text().startswith("description: add the push vector")


def test_a_failed_save_puts_the_old_file_back_atomically(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    _write_atomic(path, b"old")
    _write_atomic(path, b"new")
    _restore(path, b"old")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]
    _restore(path, None)
    assert not path.exists()


def test_preset_writes_are_off_unless_allowed(tmp_path: Path) -> None:
    app, _, _ = browser_app(tmp_path, writes=False)
    with serving(app) as base, httpx.Client(base_url=base) as client:
        r = client.post("/v1/steering/presets", json={"name": "x", "description": "d", "steering": sae_edit(1.0)})
    assert r.status_code == 403 and "saving presets is disabled" in r.json()["error"]["message"]
    assert not (tmp_path / "presets" / "x.yaml").exists()


def test_the_api_key_guards_the_json_routes_but_not_the_page(tmp_path: Path) -> None:
    app, _, _ = browser_app(tmp_path, api_key="k")
    with serving(app) as base, httpx.Client(base_url=base) as client:
        assert client.get("/v1/features/indexes").status_code == 401
        assert client.get("/v1/features/indexes", headers={"Authorization": "Bearer k"}).status_code == 200
        assert client.get("/browser").status_code == 200


def test_an_index_named_like_a_preset_sae_stops_the_server(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"feature index names \['probe'\] are also SAE names"):
        browser_app(tmp_path, features=[_copy_index(tmp_path)])


def _copy_index(tmp: Path) -> Path:
    make_sae(tmp / "sae2")
    return write_index(tmp / "probe", tmp / "sae2", [record(0, 0.1)], [])


def test_a_saved_preset_stores_every_file_reference_relative(server: tuple[httpx.Client, Any, Any, Path]) -> None:
    """Vectors, MLP probes and SAEs, in the op and in its condition, are stored relative to the presets folder (one
    walk over references, ``SteeringConfig.map_refs``), so the preset works wherever the folder is served."""
    client, tmp = server[0], server[3]
    gated = {
        "op": "add",
        "layer": 1,
        "vector": {"preset_vector": "push"},
        "apply": {"when": {"probe": "gate", "above": -1e6, "scope": "prompt", "aggregate": "mean"}},
    }
    by_vector = {"op": "ablate", "layer": 2, "vector": "push", "apply": {"when": {"vector": "planted", "above": 0.0}}}
    steering = {"interventions": [gated, by_vector]}
    r = client.post("/v1/steering/presets", json={"name": "gated_push", "description": "d", "steering": steering})
    assert r.status_code == 200, r.text
    saved = yaml.safe_load((tmp / "presets" / "gated_push.yaml").read_text())["interventions"]
    assert (saved[0]["vector"], saved[0]["apply"]["when"]["probe"]) == (
        "vectors/push.safetensors",
        "probes/gate.safetensors",
    )
    assert (saved[1]["vector"], saved[1]["apply"]["when"]["vector"]) == (
        "vectors/push.safetensors",
        "vectors/planted.safetensors",
    )
    assert chat(client, ["gated_push"]) == chat(client, steering) != chat(client, [])
