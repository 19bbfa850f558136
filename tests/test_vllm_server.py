"""Per-request steering over vLLM's own OpenAI-compatible server: ``vllm_xargs={"steering": "<config JSON>"}``.

Starts ``python -m vllm.entrypoints.openai.api_server`` with the flags from ``steerlib.vllm.serve_args()`` on a
loopback port, sends a steered and an unsteered completion, and checks them against steerlib-on-HF. A malformed
config must be answered with HTTP 400, and the server must keep serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed here: see steerlib/vllm/install.sh")

from test_vllm_steering import N_NEW, PROMPTS, _unit, hf_greedy, prompt_ids

import steerlib
from steerlib.hf.loading import embedded_model_folder
from steerlib.vllm import serve_args

pytestmark = pytest.mark.real_model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_USE_V2_MODEL_RUNNER": "0", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(embedded_model_folder())]
    cmd += ["--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--seed", "0"]
    cmd += ["--host", "127.0.0.1", "--port", str(port), *serve_args()]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stderr.read().decode()[-3000:] if proc.stderr else ''}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                time.sleep(2)
        else:
            raise TimeoutError("vLLM server not healthy after 600 s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine processes it started
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _complete(url: str, ids: list[int], xargs: dict[str, Any] | None) -> tuple[int, Any]:
    body: dict[str, Any] = {
        "model": str(embedded_model_folder()),
        "prompt": ids,
        "max_tokens": N_NEW,
        "temperature": 0.0,
        "return_token_ids": True,
    }
    if xargs is not None:
        body["vllm_xargs"] = xargs
    req = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def test_server_steers_per_request_like_hf(server: str) -> None:
    hf: tuple[Any, Any] = steerlib.load_model()
    cfg = {"interventions": [{"op": "add", "layer": 10, "vector": _unit(0, 24.0)}]}
    ids = prompt_ids(hf[1], PROMPTS[0])
    status, steered = _complete(server, ids, {"steering": json.dumps(cfg)})
    assert status == 200, steered
    status, plain = _complete(server, ids, None)
    assert status == 200, plain
    assert steered["choices"][0]["token_ids"] == hf_greedy(hf, ids, cfg)
    assert plain["choices"][0]["token_ids"] == hf_greedy(hf, ids, None)
    assert steered["choices"][0]["token_ids"] != plain["choices"][0]["token_ids"]


def test_server_rejects_a_bad_config_with_400(server: str) -> None:
    bad = json.dumps({"interventions": [{"op": "add", "layer": 3, "vectr": [1.0]}]})
    status, body = _complete(server, [1, 2, 3], {"steering": bad})
    assert status == 400, body
    assert "vectr" in json.dumps(body)
    assert _complete(server, [1, 2, 3], None)[0] == 200


def test_server_answers_a_config_that_does_not_fit_the_model_with_an_error(server: str) -> None:
    """Layer 99 of a 30-layer model passes the front end's schema check; the engine rejects that request alone."""
    bad = json.dumps({"interventions": [{"op": "add", "layer": 99, "vector": _unit(0, 4.0)}]})
    status, body = _complete(server, [1, 2, 3], {"steering": bad})
    assert status == 500 and body["error"]["type"] == "InternalServerError", body
    assert _complete(server, [1, 2, 3], None)[0] == 200
