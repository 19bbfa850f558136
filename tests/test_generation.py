"""Steering through ``generate`` with the KV cache: prompt/generated positions, left padding, per-row configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from tiny_models import ARCHS, tiny_model
from torch import Tensor

from steerlib import SteeringConfig, hooks_installed, steer

D = 64
NEW = 6


def cfg(*interventions: dict[str, Any]) -> SteeringConfig:
    return SteeringConfig.model_validate({"interventions": list(interventions)})


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


def generate(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> Any:
    with torch.no_grad():
        return model.generate(  # type: ignore[operator]
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            return_dict_in_generate=True,
            output_logits=True,
            pad_token_id=0,
        )


def left_pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


PROMPTS = [[5, 17, 33, 2, 90], [8, 44, 3], [61, 62, 63, 64, 65, 66, 67], [12, 13]]


def test_generated_only_leaves_first_new_token_untouched(model: torch.nn.Module) -> None:
    ids, mask = left_pad(PROMPTS[:2])
    clean = generate(model, ids, mask)
    v = torch.randn(D) * 4
    with steer(model, cfg({"op": "add", "layer": 1, "vector": v.tolist(), "apply": {"tokens": "generated"}})):
        steered = generate(model, ids, mask)
    torch.testing.assert_close(steered.logits[0], clean.logits[0], rtol=0, atol=0)
    for step in range(1, NEW):
        assert (steered.logits[step] - clean.logits[step]).abs().max() > 1e-4


def test_prompt_only_steers_the_prompt_and_nothing_after(model: torch.nn.Module) -> None:
    ids, mask = left_pad(PROMPTS[:2])
    v = torch.randn(D) * 4
    with steer(model, cfg({"op": "add", "layer": 1, "vector": v.tolist(), "apply": {"tokens": "prompt"}})):
        steered = generate(model, ids, mask)
    # Replaying the steered sequence with the prompt steered must give the same logits at every step:
    # this only holds if decode steps were left alone.
    full = steered.sequences
    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], dim=1)
    prompt_len = ids.shape[1]
    # In one forward every token counts as prompt, so the replay limits steering to each row's real prompt.
    per_row: list[SteeringConfig | None] = [
        cfg({"op": "add", "layer": 1, "vector": v.tolist(), "apply": {"window": [0, len(p)]}}) for p in PROMPTS[:2]
    ]
    with steer(model, per_row), torch.no_grad():
        replay = model(input_ids=full[:, :-1], attention_mask=full_mask[:, :-1]).logits
    for step in range(NEW):
        torch.testing.assert_close(replay[:, prompt_len - 1 + step], steered.logits[step], atol=1e-4, rtol=1e-4)


def test_per_row_configs_match_rows_run_alone(model: torch.nn.Module) -> None:
    configs: list[SteeringConfig | None] = [
        cfg(
            {
                "op": "add",
                "layer": 1,
                "vector": (torch.randn(D) * 3).tolist(),
                "apply": {"tokens": "generated"},
            }
        ),
        None,
        cfg({"op": "ablate", "layer": 0, "vector": torch.randn(D).tolist()}),
        cfg({"op": "add", "layer": 2, "vector": (torch.randn(D) * 3).tolist(), "apply": {"last": 2}}),
    ]
    ids, mask = left_pad(PROMPTS)
    with steer(model, configs):
        batched = generate(model, ids, mask)
    for r, (prompt, c) in enumerate(zip(PROMPTS, configs, strict=True)):
        one_ids, one_mask = left_pad([prompt])
        if c is None:
            alone = generate(model, one_ids, one_mask)
        else:
            with steer(model, c):
                alone = generate(model, one_ids, one_mask)
        assert batched.sequences[r, ids.shape[1] :].tolist() == alone.sequences[0, one_ids.shape[1] :].tolist()
        for step in range(NEW):
            torch.testing.assert_close(batched.logits[step][r], alone.logits[step][0], atol=1e-4, rtol=1e-4)
    assert hooks_installed(model) == 0


def test_per_row_configs_need_one_per_row(model: torch.nn.Module) -> None:
    ids, mask = left_pad(PROMPTS[:3])
    with (
        pytest.raises(ValueError, match="2 per-row configs but the batch has 3 rows"),
        steer(model, [cfg({"op": "add", "layer": 1, "vector": [1.0] * D}), None]),
    ):
        generate(model, ids, mask)
    assert hooks_installed(model) == 0


def test_prompt_scoped_gate_holds_through_generation(model: torch.nn.Module) -> None:
    """A probe read once on the prompt decides for the whole row (conditional activation steering)."""
    ids, mask = left_pad(PROMPTS[:2])
    with torch.no_grad():
        h = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    probe = torch.randn(D)
    last_scores = h[:, -1] @ probe  # left padding: the last column is each row's last prompt token
    thr = float(last_scores.mean())
    fires = (last_scores > thr).tolist()
    assert fires in ([True, False], [False, True])
    v = (torch.randn(D) * 4).tolist()
    gated = cfg(
        {
            "op": "add",
            "layer": 0,
            "vector": v,
            "apply": {
                "tokens": "generated",
                "when": {"vector": probe.tolist(), "above": thr, "scope": "prompt"},
            },
        }
    )
    clean = generate(model, ids, mask)
    with steer(model, gated):
        out = generate(model, ids, mask)
    with steer(model, cfg({"op": "add", "layer": 0, "vector": v, "apply": {"tokens": "generated"}})):
        always = generate(model, ids, mask)
    for r in range(2):
        expected = always if fires[r] else clean
        for step in range(NEW):
            torch.testing.assert_close(out.logits[step][r], expected.logits[step][r], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "llama"])
def test_per_row_isolation_on_every_architecture(arch: str) -> None:
    model = tiny_model(arch, n_layers=2)
    configs: list[SteeringConfig | None] = [
        cfg({"op": "add", "layer": 1, "vector": (torch.randn(D) * 3).tolist(), "apply": {"tokens": "generated"}}),
        None,
        cfg({"op": "ablate", "layer": 0, "site": "mlp_out", "vector": torch.randn(D).tolist()}),
    ]
    prompts = PROMPTS[:3]
    ids, mask = left_pad(prompts)
    with steer(model, configs):
        batched = generate(model, ids, mask)
    for r, (prompt, c) in enumerate(zip(prompts, configs, strict=True)):
        one_ids, one_mask = left_pad([prompt])
        with steer(model, [c]):
            alone = generate(model, one_ids, one_mask)
        assert batched.sequences[r, ids.shape[1] :].tolist() == alone.sequences[0, one_ids.shape[1] :].tolist()
        torch.testing.assert_close(batched.logits[-1][r], alone.logits[-1][0], atol=1e-4, rtol=1e-4)
