"""``python -m servers [--model NAME_OR_PATH] [--device auto|cpu|cuda:N] [--dtype auto|bfloat16|float16|float32]
[--presets DIR] [--host H] [--port P] [--config server.yaml] ...``

Flags beat ``STEERLIB_SERVER_*`` environment variables, which beat the YAML file.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from servers.settings import ServerSettings, load_settings

log = logging.getLogger("servers")

LIST_FIELDS = ("default_presets", "features", "allowed_hosts", "allowed_origins")
"""Settings that take several values after their flag (``--features DIR1 DIR2``)."""


def parse_args(argv: list[str] | None = None) -> tuple[dict[str, Any], Path | None]:
    p = argparse.ArgumentParser(prog="python -m servers", description="OpenAI-compatible steered generation server")
    p.add_argument("--config", type=Path, help="YAML settings file (keys as the long flags, with underscores)")
    for name, f in ServerSettings.model_fields.items():
        if name in LIST_FIELDS:
            p.add_argument(f"--{name.replace('_', '-')}", nargs="*", help=f.description)
        else:
            p.add_argument(f"--{name.replace('_', '-')}", help=f.description)
    args = vars(p.parse_args(argv))
    config = args.pop("config")
    return {k: v for k, v in args.items() if v is not None}, config


def load_served_model(settings: ServerSettings) -> tuple[Any, Any, str]:
    """``(model, tokenizer, name clients pass)`` for ``settings``: the model on its ``device`` in its ``dtype``;
    with ``engine: vllm`` the model's skeleton (vLLM loads the weights when the engine starts)."""
    import steerlib
    from steerlib.hf.loading import EMBEDDED_NAME

    if settings.engine == "vllm":
        import importlib.util

        from servers.vllm_engine import model_source, skeleton

        if importlib.util.find_spec("vllm") is None:
            raise SystemExit(
                "--engine vllm needs vLLM in this environment: pip install 'steerlib[vllm]' "
                "(on a CPU: bash steerlib/vllm/install.sh, then run the server with that venv's python)"
            )

        model, tokenizer = skeleton(model_source(settings.model))
    else:
        model, tokenizer = steerlib.load_model(settings.model, device=settings.device, dtype=settings.dtype)
    name = settings.model_name or (EMBEDDED_NAME if settings.model is None else Path(settings.model).name)
    params = next(model.parameters())
    log.info("model %s on %s in %s (engine %s)", name, params.device, params.dtype, settings.engine)
    return model, tokenizer, name


def main(argv: list[str] | None = None) -> None:
    flags, config = parse_args(argv)
    settings = load_settings(flags, config)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch
    import uvicorn

    from servers.app import create_app

    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    model, tokenizer, name = load_served_model(settings)
    app = create_app(settings, model, tokenizer, name)
    # uvicorn waits this long for open connections on shutdown, then the lifespan cancels what is left.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=max(1, int(settings.shutdown_grace_s)),
    )


if __name__ == "__main__":
    main()
