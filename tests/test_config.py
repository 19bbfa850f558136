"""The steering config: the issue's example loads as written; bad input names the field and the allowed values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from steerlib import AblateOp, AddOp, SaeOp, SteeringConfig

EXAMPLE = """\
interventions:
  - layer: 15
    site: resid_post        # resid_pre | resid_post | attn_out | mlp_out | mlp_in
    op: add                 # add a vector times a coefficient
    vector: vectors/refusal.safetensors   # or an inline list of floats
    coefficient: 4.0
    apply: {tokens: generated}            # all | prompt | generated
  - layer: 10
    site: resid_post
    op: ablate              # project the direction out
    vector: vectors/harm.safetensors
  - layer: 15
    site: resid_post
    op: sae                 # encode, edit features, decode
    sae: saes/example
    edits:
      - {feature: 123, mode: set, value: 8.0}     # set | scale | add
      - {feature: 77, mode: scale, value: 0.0}
    error_term: keep        # keep: output = x + decode(edited) - decode(original); drop: output = decode(edited)
    apply:
      tokens: all
      when: {feature: 456, above: 2.0}           # apply only where this SAE feature (or a probe vector) fires
"""


def test_issue_example_loads_exactly(tmp_path: Path) -> None:
    (tmp_path / "cfg.yaml").write_text(EXAMPLE)
    cfg = SteeringConfig.from_file(tmp_path / "cfg.yaml")
    add, ablate, sae = cfg.interventions
    assert isinstance(add, AddOp) and isinstance(ablate, AblateOp) and isinstance(sae, SaeOp)
    assert (add.layer, add.site, add.coefficient, add.apply.tokens) == (15, "resid_post", 4.0, "generated")
    assert cfg.resolve(add.vector) == tmp_path.resolve() / "vectors/refusal.safetensors"  # type: ignore[arg-type]
    assert cfg.resolve(sae.sae) == tmp_path.resolve() / "saes/example"
    assert [(e.feature, e.mode, e.value) for e in sae.edits] == [(123, "set", 8.0), (77, "scale", 0.0)]
    assert sae.error_term == "keep"
    assert sae.apply.when is not None and (sae.apply.when.feature, sae.apply.when.above) == (456, 2.0)


def test_json_and_yaml_agree(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(EXAMPLE)
    import yaml

    (tmp_path / "a.json").write_text(json.dumps(yaml.safe_load(EXAMPLE)))
    assert SteeringConfig.from_file(tmp_path / "a.json") == SteeringConfig.from_file(tmp_path / "a.yaml")


def test_transformerlens_site_name() -> None:
    cfg = SteeringConfig.model_validate(
        {"interventions": [{"op": "add", "site": "blocks.15.hook_resid_post", "vector": [1.0]}]}
    )
    assert (cfg.interventions[0].layer, cfg.interventions[0].site) == (15, "resid_post")
    with pytest.raises(ValidationError, match="names layer 15 but layer is 3"):
        SteeringConfig.model_validate(
            {"interventions": [{"op": "add", "layer": 3, "site": "blocks.15.hook_resid_post", "vector": [1.0]}]}
        )


@pytest.mark.parametrize(
    ("intervention", "message"),
    [
        ({"op": "add", "layer": 1, "vector": [1.0], "coefficent": 2.0}, "coefficent"),  # typo: unknown field
        ({"op": "add", "layer": 1, "site": "resid_mid", "vector": [1.0]}, "allowed: resid_pre, resid_post"),
        ({"op": "steer", "layer": 1, "vector": [1.0]}, "'add', 'ablate', 'sae', 'replace'"),
        ({"op": "add", "layer": 1, "vector": [1.0, float("nan")]}, "NaN or inf"),
        (
            {"op": "add", "layer": 1, "vector": [1.0], "coefficient": float("inf")},
            "coefficient\n  Input should be a finite number",
        ),
        ({"op": "add", "layer": -1, "vector": [1.0]}, "layer must be >= 0"),
        (
            {"op": "add", "layer": 1, "vector": [1.0], "apply": {"tokens": "response"}},
            "'all', 'prompt' or 'generated'",
        ),
        (
            {"op": "sae", "layer": 1, "sae": "x", "edits": [{"feature": 1, "mode": "clamp", "value": 1}]},
            "'set', 'scale' or 'add'",
        ),
        ({"op": "add", "layer": 1, "vector": [1.0], "apply": {"when": {"feature": 3}}}, "give a threshold"),
        ({"op": "add", "layer": 1, "vector": [1.0], "apply": {"window": [5, 2]}}, "window must be"),
    ],
)
def test_bad_input_names_the_field(intervention: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        SteeringConfig.model_validate({"interventions": [intervention]})
    assert message in str(info.value)


def test_config_is_frozen() -> None:
    cfg = SteeringConfig.model_validate({"interventions": [{"op": "add", "layer": 1, "vector": [1.0]}]})
    with pytest.raises(ValidationError):
        cfg.interventions[0].coefficient = 3.0  # type: ignore[misc]


def test_every_file_reference_is_listed_and_mapped_in_one_walk(tmp_path: Path) -> None:
    cfg = SteeringConfig.from_dict(
        {
            "interventions": [
                {"layer": 1, "op": "add", "vector": "v.safetensors", "apply": {"when": {"probe": "p.safetensors",
                                                                                       "above": 0, "scope": "prompt"}}},
                {"layer": 2, "op": "ablate", "vector": [1.0, 0.0]},
                {"op": "sae", "sae": "saes/a", "apply": {"when": {"feature": 3, "sae": "saes/b", "above": 0}}},
                {"layer": 0, "op": "refuse", "apply": {"when": {"vector": "h.safetensors", "above": 0,
                                                                "scope": "prompt"}}},
            ]
        },
        base_dir=tmp_path,
    )  # fmt: skip
    assert [(r.where, r.kind, r.ref) for r in cfg.refs()] == [
        ("interventions[0].vector", "vector", "v.safetensors"),
        ("interventions[0].apply.when.probe", "probe", "p.safetensors"),
        ("interventions[2].sae", "sae", "saes/a"),
        ("interventions[2].apply.when.sae", "sae", "saes/b"),
        ("interventions[3].apply.when.vector", "vector", "h.safetensors"),
    ]
    mapped = cfg.map_refs(lambda r: f"/root/{r.kind}/{r.ref}")
    assert [r.ref for r in mapped.refs()] == [f"/root/{r.kind}/{r.ref}" for r in cfg.refs()]
    assert mapped.base_dir == cfg.base_dir and mapped.interventions[1] == cfg.interventions[1]  # inline kept
    assert cfg.refs()[0].ref == "v.safetensors"  # the original is untouched
