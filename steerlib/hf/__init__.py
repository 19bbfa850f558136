"""The HuggingFace transformers backend: hooks on a ``PreTrainedModel``, model loading, model layouts."""

from steerlib.hf.hooks import SteeringHandle, attach, hooks_installed, steer

__all__ = ["SteeringHandle", "attach", "hooks_installed", "steer"]
