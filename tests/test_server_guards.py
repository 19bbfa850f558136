"""The guards around every route: body size (413 before parsing), Origin/Host checks against browser attacks (CSRF,
DNS rebinding), empty API keys refused, /health following the engine thread, no server paths in errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from test_server_support import MODEL_NAME, make_app, make_presets, serving, words
from tiny_models import tiny_model

from servers.settings import ServerSettings, load_settings

CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": words(10, 11)}], "max_tokens": 2}
LOCAL = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def presets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_presets(tmp_path_factory.mktemp("presets"))


def test_a_body_over_the_limit_is_a_413_before_it_is_parsed(presets: Path) -> None:
    app = make_app(presets, max_body_bytes=2048)
    padded = CHAT | {"user": "x" * 1500}
    with serving(app) as url:
        assert httpx.post(f"{url}/v1/chat/completions", json=padded).status_code == 200
        big = httpx.post(f"{url}/v1/chat/completions", json=CHAT | {"user": "x" * 3000})
        chunks = iter([b'{"model": "' + MODEL_NAME.encode() + b'", "user": "', b"x" * 3000, b'"}'])
        chunked = httpx.post(f"{url}/v1/chat/completions", content=chunks, headers={"content-type": "application/json"})
    for r in (big, chunked):
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text
        assert "larger than 2048 bytes (max_body_bytes)" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def local(presets: Path) -> Iterator[TestClient]:
    """The server as a browser on this machine reaches it (Host 127.0.0.1:8000)."""
    with TestClient(make_app(presets, allowed_origins=["https://ui.example"]), base_url=LOCAL) as c:
        yield c


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # an SDK or curl: no browser headers
        ({"origin": LOCAL, "sec-fetch-site": "same-origin"}, 200),  # the /browser page itself
        ({"origin": "https://ui.example"}, 200),  # allowed_origins
        ({"origin": "https://evil.example", "sec-fetch-site": "cross-site"}, 403),  # CSRF from any page
        ({"origin": "null"}, 403),  # sandboxed frames and file:// pages
        ({"origin": "http://127.0.0.1:9999"}, 403),  # another local service's page
    ],
)
def test_browser_requests_must_come_from_the_servers_own_origin(
    local: TestClient, headers: dict[str, str], status: int
) -> None:
    r = local.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] == "forbidden_origin" and "allowed_origins" in r.json()["error"]["message"]


def test_dns_rebinding_and_cross_site_reads_are_refused(presets: Path, local: TestClient) -> None:
    """A page whose host name now resolves to 127.0.0.1 is same-origin to its browser but names its own host."""
    with TestClient(make_app(presets), base_url="http://evil.example:8000") as rebound:
        same = {"origin": "http://evil.example:8000", "sec-fetch-site": "same-origin"}
        r = rebound.post("/v1/chat/completions", json=CHAT, headers=same)
        assert r.status_code == 403 and "host 'evil.example:8000' is not served here" in r.json()["error"]["message"]
        assert rebound.get("/v1/models", headers={"sec-fetch-site": "same-origin"}).status_code == 403
        assert rebound.get("/v1/models").status_code == 200  # not a browser: nothing to rebind
    cross = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "cors"}
    assert local.get("/v1/steering/presets", headers=cross).status_code == 403
    assert local.get("/health", headers=cross | {"sec-fetch-mode": "navigate"}).status_code == 200  # a link


def test_allowed_hosts_checks_every_request(presets: Path) -> None:
    with TestClient(make_app(presets, allowed_hosts=["api.example"]), base_url="http://api.example") as ok:
        assert ok.get("/v1/models").status_code == 200
    with TestClient(make_app(presets, allowed_hosts=["api.example"])) as other:  # Host: testserver
        assert other.get("/v1/models").status_code == 403


def test_an_empty_api_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("", "  "):
        with pytest.raises(ValidationError, match="api_key is empty"):
            ServerSettings(api_key=key)
    monkeypatch.setenv("STEERLIB_SERVER_API_KEY", "")
    with pytest.raises(ValidationError, match="api_key is empty"):
        load_settings({})


def test_health_follows_the_engine_thread(presets: Path) -> None:
    model = tiny_model("llama", 2)
    with TestClient(make_app(presets, model)) as c:
        assert c.get("/health").json()["status"] == "ok"
        # A model that takes the whole worker thread down (SystemExit is not an error the engine recovers from).
        handle = model.register_forward_pre_hook(lambda *_: (_ for _ in ()).throw(SystemExit("model gone")))
        try:
            assert c.post("/v1/chat/completions", json=CHAT).status_code == 503
        finally:
            handle.remove()
        health = c.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "dead"
        r = c.post("/v1/chat/completions", json=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"


def test_health_says_stopped_after_shutdown(presets: Path) -> None:
    app = make_app(presets)
    with TestClient(app) as c:
        c.portal.call(app.state.steerlib.engine.shutdown, 0.0)  # type: ignore[union-attr]
        r = c.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "stopped"


def test_errors_never_show_server_paths(tmp_path: Path) -> None:
    root = make_presets(tmp_path / "presets")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (root / "saes" / "escape").symlink_to(outside)
    (root / "vectors" / "gone.safetensors").symlink_to(tmp_path / "missing.safetensors")
    messages = []
    with TestClient(make_app(root)) as c:
        for iv in ({"op": "replace", "sae": "escape"}, {"op": "add", "layer": 1, "vector": "gone"}):
            r = c.post("/v1/chat/completions", json=CHAT | {"steering": {"interventions": [iv]}})
            assert r.status_code == 400
            messages.append(r.json()["error"]["message"])
    assert not any(str(tmp_path) in m for m in messages), messages
    assert "saes/escape is outside the presets folder" in messages[0]


def test_a_json_body_needs_a_json_content_type(local: TestClient) -> None:
    """A form or a text/plain "simple request" (no CORS preflight) cannot carry a body the API reads."""
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
        r = local.post("/v1/chat/completions", content=json.dumps(CHAT), headers={"content-type": kind})
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (kind, r.text)
