"""The conditional steering recipe's config: a detector's gate, the gated ``add`` op of the learned vector, the preset.

The gate is the condition of a detector config's ``refuse`` op (:mod:`evals.recipes.detector`): its probe file,
metric, pooling and threshold, read at its layer. The recipe adds its learned vector after that layer, to every token
of a row whose prompt the gate flags (:mod:`evals.recipes.steering` builds it). Files sit in the recipe's output
folder: ``vectors/refusal_learned_l{layer}.safetensors``, the probe under ``vectors/`` or ``probes/``, and the preset
``refusal_steering.yaml`` (a steering config with a ``description``, written by ``yaml.safe_dump``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from steerlib.config import RefuseOp, SteeringConfig

PRESET_FILE = "refusal_steering.yaml"


def vector_file(layer: int) -> str:
    """The learned vector's file, relative to the recipe's output folder."""
    return f"vectors/refusal_learned_l{layer}.safetensors"


@dataclass(frozen=True)
class DetectorGate:
    """The prompt condition of a detector: its probe file's score on the prompt after ``layer`` above ``above``."""

    layer: int
    file: Path
    """A linear probe (a vector file, scored with ``metric``) or, with ``kind="probe"``, an MLP probe file."""
    metric: str
    above: float
    aggregate: str = "last"
    kind: Literal["vector", "probe"] = "vector"

    @property
    def folder(self) -> str:
        return "vectors" if self.kind == "vector" else "probes"

    def when(self) -> dict[str, Any]:
        """The ``when`` condition, the probe file under ``{folder}/`` of the recipe's output."""
        metric = {"metric": self.metric} if self.kind == "vector" else {}
        where = {self.kind: f"{self.folder}/{self.file.name}"}
        return where | metric | {"above": self.above, "scope": "prompt", "aggregate": self.aggregate}


def read_gate(detector: Path) -> DetectorGate:
    """The condition of the first ``refuse`` op of a detector config (its probe, metric, pooling and threshold)."""
    cfg = SteeringConfig.from_file(detector)
    for iv in cfg.interventions:
        if isinstance(iv, RefuseOp) and iv.apply.when is not None:
            w = iv.apply.when
            kind: Literal["vector", "probe"] = "vector" if w.probe is None else "probe"
            ref = w.vector if kind == "vector" else w.probe
            if not isinstance(iv.layer, int) or not isinstance(ref, str) or w.above is None:
                raise ValueError(f"{detector}: the refuse op needs one layer, a vector or probe file and 'above'")
            return DetectorGate(iv.layer, cfg.resolve(ref), w.metric, w.above, w.aggregate, kind)
    raise ValueError(f"{detector}: no 'refuse' op with a 'when' condition to use as the gate")


def add_op(gate: DetectorGate, coefficient: float, *, gated: bool = True) -> dict[str, Any]:
    """The recipe's ``add`` op as data: the learned vector after the gate's layer, on every token, under the gate."""
    apply: dict[str, Any] = {"tokens": "all"} | ({"when": gate.when()} if gated else {})
    return {
        "op": "add",
        "layer": gate.layer,
        "site": "resid_post",
        "vector": vector_file(gate.layer),
        "coefficient": coefficient,
        "apply": apply,
    }


def steering_config(out: Path, gate: DetectorGate, coefficient: float, *, gated: bool = True) -> SteeringConfig:
    """The recipe's config (files under ``out``), with or without the gate."""
    return SteeringConfig.from_dict({"interventions": [add_op(gate, coefficient, gated=gated)]}, base_dir=out)


def description(gate: DetectorGate, coefficient: float, *, keep: bool) -> str:
    """What the preset says about itself: how it was built and where its held-out numbers are."""
    trained_on = "refusals after training harmful prompts" + (
        ", the model's own answers after training harmless ones" if keep else ""
    )
    where = "last prompt token" if gate.aggregate == "last" else f"{gate.aggregate} over the prompt"
    return (
        "Conditional refusal steering (Lee et al., arXiv 2409.05907), built by `python -m evals.recipes.steering`: a "
        f"steering vector learned by gradient descent ({trained_on}, model frozen) is added after layer {gate.layer} "
        f"to every token of a row, only when the detector's harmfulness probe (layer {gate.layer}, {where}) fires on "
        f"its prompt. The model writes the refusal itself (no fixed message). Coefficient {coefficient:g} chosen on "
        "training prompts. Held-out numbers: evals/recipes/results/refusal_steering_smollm2.json."
    )


def write_preset(out: Path, gate: DetectorGate, coefficient: float, *, keep: bool) -> Path:
    """``out/refusal_steering.yaml``: the gated config with its description, as a server preset."""
    data = {"description": description(gate, coefficient, keep=keep), "interventions": [add_op(gate, coefficient)]}
    SteeringConfig.from_dict(data, base_dir=out)  # a preset that would not load is never written
    path = out / PRESET_FILE
    path.write_text(yaml.safe_dump(data, sort_keys=False, width=116))
    return path
