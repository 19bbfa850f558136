"""Expand named steering configs into the arms of an eval: sweeps, random-vector controls and attacked variants.

Naming: ``<config>[@L=<layer>][@c=<coefficient>]`` for a config swept over layers and coefficients, ``random(<arm>)``
for its same-norm random twin (:func:`evals.controls.random_control`), ``<arm>+attack`` for the arm under the
refusal-direction ablation attack (:mod:`evals.attack`), and ``random-ablation`` for the attack's control (ablating a
random direction of the same norm instead of the refusal direction).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from evals.attack import ablation_attack
from evals.controls import combine, random_control, with_coefficient, with_layer
from evals.runner import Arm
from steerlib.config import AddOp, SteeringConfig


def has_add(config: SteeringConfig) -> bool:
    return any(isinstance(iv, AddOp) for iv in config.interventions)


def sweep(
    name: str,
    config: SteeringConfig,
    *,
    coefficients: Sequence[float] = (),
    layers: Sequence[int] = (),
    random: bool = False,
    seed: int = 0,
) -> list[Arm]:
    """The config's arms: one per (layer, coefficient) of the sweep (as written when both are empty), each
    followed by its random control when ``random`` and the config adds a vector."""
    out: list[Arm] = []
    layer_list: Sequence[int | None] = list(layers) if layers else [None]
    for layer in layer_list:
        cfg_l = config if layer is None else with_layer(config, layer)
        coefs: Sequence[float | None] = coefficients if coefficients and has_add(config) else [None]
        for c in coefs:
            cfg = cfg_l if c is None else with_coefficient(cfg_l, c)
            arm_name = name + ("" if layer is None else f"@L={layer}") + ("" if c is None else f"@c={c:g}")
            out.append(Arm(arm_name, cfg, c, layer=layer))
            if random and has_add(config):
                out.append(Arm(f"random({arm_name})", random_control(cfg, seed), c, control_of=arm_name, layer=layer))
    return out


def attacked(arms: Sequence[Arm], direction: torch.Tensor, *, seed: int = 0) -> list[Arm]:
    """Each config (or unsteered) arm again under the ablation attack, plus one random-direction ablation control."""
    attack = ablation_attack(direction)
    out = []
    for arm in arms:
        if arm.steering is not None and not isinstance(arm.steering, SteeringConfig):
            continue  # preset names cannot be combined locally with the attack
        if arm.control_of is not None:
            continue
        name = "attack" if arm.steering is None else f"{arm.name}+attack"
        out.append(Arm(name, combine(arm.steering, attack), arm.coefficient, layer=arm.layer))
    gen = torch.Generator(device="cpu").manual_seed(seed)  # host-drawn: one seed, one control on every device
    r = torch.randn(direction.shape, generator=gen, device="cpu").to(direction.device)
    out.append(Arm("random-ablation", ablation_attack(r / r.norm() * direction.norm()), control_of="attack"))
    return out
