"""Steering vectors in the formats people share: llama.cpp / repeng GGUF control vectors, repeng ``ControlVector`` and
steering-vectors ``SteeringVector`` objects, to and from steerlib vector files and configs.

Everything meets in one place: a per-layer :class:`~steerlib.vectors.SteeringVector` whose metadata ``site`` says where
its layer-``L`` tensor is added (``resid_post`` for control vectors: after decoder block ``L``, no shift; see
:mod:`steerlib.interchange.gguf_control` for the llama.cpp and repeng sources that fix this).

    from steerlib.interchange import read_gguf, write_config
    write_config(read_gguf("happy.gguf"), "happy.yaml", scale=0.8, layer_range=(10, 20))

The command line is ``python -m steerlib.convert IN OUT``. repeng and steering-vectors are imported only by the
functions that build their objects.
"""

from __future__ import annotations

from steerlib.interchange.configs import config_to_vector, vector_to_config, write_config
from steerlib.interchange.gguf_control import read_gguf, save_gguf, write_gguf
from steerlib.interchange.placement import LayerRange, select_layers
from steerlib.interchange.repeng_objects import from_repeng, import_repeng, to_repeng
from steerlib.interchange.sv_objects import from_steering_vectors, to_steering_vectors

__all__ = [
    "LayerRange",
    "config_to_vector",
    "from_repeng",
    "from_steering_vectors",
    "import_repeng",
    "read_gguf",
    "save_gguf",
    "select_layers",
    "to_repeng",
    "to_steering_vectors",
    "vector_to_config",
    "write_config",
    "write_gguf",
]
