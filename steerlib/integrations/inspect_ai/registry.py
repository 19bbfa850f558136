"""Inspect's entry point for steerlib (``[project.entry-points.inspect_ai]`` in pyproject.toml).

Inspect imports this module when it resolves a model name it does not know; the ``@modelapi`` decorator registers
the ``steerlib`` provider. Only inspect_ai is imported here: torch, transformers and the provider itself load when a
``steerlib/<model>`` model is first created.
"""

from __future__ import annotations

from inspect_ai.model import ModelAPI, modelapi


@modelapi(name="steerlib")
def steerlib_provider() -> type[ModelAPI]:
    from steerlib.integrations.inspect_ai.provider import SteerlibAPI

    return SteerlibAPI
