"""Shared pieces of the server tests: a tiny model with a real WordLevel chat tokenizer, a presets folder, and a
uvicorn server on a free loopback port in a background thread. (No tests here; the test files import these.)"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import uvicorn
import yaml
from fastapi import FastAPI
from tiny_models import tiny_model, word_tokenizer

from servers.app import create_app
from servers.settings import ServerSettings
from steerlib.mlp_probe import MlpProbe
from steerlib.sae import ReluSae, SaeMeta, save_sae
from steerlib.vectors import SteeringVector

D, SAE_WIDTH, SAE_LAYER = 64, 16, 1
MODEL_NAME = "tiny-llama"


def words(*ids: int) -> str:
    return " ".join(f"w{i}" for i in ids)


def make_presets(root: Path) -> Path:
    """vectors/push (64 floats), saes/probe (ReLU SAE at blocks.1.hook_resid_post), probes/gate (an MLP probe),
    presets push/erase/sae_edit."""
    gen = torch.Generator().manual_seed(1)
    SteeringVector.single(torch.randn(D, generator=gen) * 3).save(root / "vectors" / "push.safetensors")
    W = torch.randn(4, D, generator=gen)
    MlpProbe(W, torch.zeros(4), torch.ones(4), torch.tensor(0.0)).save(root / "probes" / "gate.safetensors")
    site = f"blocks.{SAE_LAYER}.hook_resid_post"
    sae = ReluSae(SaeMeta("relu", D, SAE_WIDTH, D, input_site=site, output_site=site))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, SAE_WIDTH, generator=gen))
        sae.W_dec.copy_(torch.randn(SAE_WIDTH, D, generator=gen) / 4)
    save_sae(sae, root / "saes" / "probe")
    presets: dict[str, dict[str, Any]] = {
        "push": {
            "description": "add the push vector at layer 1",
            "interventions": [{"op": "add", "layer": 1, "vector": "vectors/push.safetensors", "coefficient": 2.0}],
        },
        "erase": {
            "description": "ablate the push direction at every layer",
            "interventions": [{"op": "ablate", "layer": "all", "vector": "vectors/push.safetensors"}],
        },
        "sae_edit": {
            "description": "set probe feature 3 to 6",
            "interventions": [
                {
                    "op": "sae",
                    "layer": SAE_LAYER,
                    "sae": "saes/probe",
                    "edits": [{"feature": 3, "mode": "set", "value": 6.0}],
                }
            ],
        },
    }
    for name, data in presets.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(data))
    return root


def make_app(presets: Path, model: torch.nn.Module | None = None, **settings: Any) -> FastAPI:
    s = ServerSettings.model_validate({"presets": presets, "batch_wait_ms": 20} | settings)
    return create_app(s, model if model is not None else tiny_model("llama", 3), word_tokenizer(), MODEL_NAME)


@contextmanager
def serving(app: FastAPI, start_s: float = 20) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port; yields the base URL, stops the server on exit. ``start_s``:
    how long its start (the lifespan's, which starts the engine) may take."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


@contextmanager
def serving_guard(root: Path, message: str, mode: str = "message", **settings: Any) -> Iterator[str]:
    """A tiny-model server whose presets include ``guard``: a ``refuse`` op named ``always`` that fires on every
    prompt (a probe with an unreachable threshold) and answers with ``message`` in ``mode``."""
    make_presets(root)
    guard = {
        "description": f"refuse every prompt ({mode} mode; a probe with an unreachable threshold)",
        "interventions": [{
            "op": "refuse", "layer": 1, "name": "always", "message": message, "mode": mode,
            "apply": {"when": {"vector": "vectors/push.safetensors", "above": -1.0e9, "scope": "prompt"}},
        }],
    }  # fmt: skip
    (root / "guard.yaml").write_text(yaml.safe_dump(guard))
    with serving(make_app(root, tiny_model("llama", 3), **settings)) as base:
        yield base
