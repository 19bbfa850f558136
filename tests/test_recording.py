"""Recording on a tiny seeded Llama: what is recorded, at which tokens, and how it meets steering and generate."""

from __future__ import annotations

from contextlib import AbstractContextManager, ExitStack
from typing import Any

import pytest
import torch
from tiny_models import tiny_model
from torch import Tensor

from steerlib import SteeringConfig, hooks_installed, steer
from steerlib.hf.recording import Recording, record

D = 64
NEW = 4
PROMPTS = [[5, 17, 33, 2, 90], [8, 44, 3], [61, 62, 63, 64]]


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


def left_pad(rows: list[list[int]]) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def forward(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> tuple[Tensor, ...]:
    """hidden_states of one forward, positions counted from each row's first real token (as generate does)."""
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
            output_hidden_states=True,
        )
    hidden: tuple[Tensor, ...] = out.hidden_states
    return hidden


def generate(model: torch.nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    with torch.no_grad():
        return model.generate(  # type: ignore[operator]
            input_ids=ids, attention_mask=mask, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0
        )


def add(layer: int, site: str, v: Tensor) -> SteeringConfig:
    return SteeringConfig.model_validate(
        {"interventions": [{"op": "add", "layer": layer, "site": site, "vector": v.tolist()}]}
    )


def recorded(
    model: torch.nn.Module, site: str, ids: Tensor, mask: Tensor, *first: AbstractContextManager[Any]
) -> Tensor:
    """Record ``site`` during one forward, entering ``first`` (steering) before or after the recording."""
    with ExitStack() as stack:
        for cm in first:
            stack.enter_context(cm)
        rec: Recording = stack.enter_context(record(model, [site]))
        forward(model, ids, mask)
    return rec[site]


@pytest.mark.parametrize(
    ("layer", "site"),
    [(1, "resid_post"), (0, "resid_pre"), (2, "resid_pre"), (1, "attn_out"), (1, "mlp_in"), (1, "mlp_out")],
)
@pytest.mark.parametrize("steer_first", [True, False])
def test_recording_sees_the_steered_stream(model: torch.nn.Module, layer: int, site: str, steer_first: bool) -> None:
    ids, mask = left_pad(PROMPTS)
    name = f"blocks.{layer}.hook_{site}"
    v = torch.randn(D)
    clean = recorded(model, name, ids, mask)
    if steer_first:
        steered = recorded(model, name, ids, mask, steer(model, add(layer, site, v)))
    else:  # steering attached after the recording hooks still runs before them
        with record(model, [name]) as rec, steer(model, add(layer, site, v)):
            forward(model, ids, mask)
        steered = rec[name]
    assert clean.shape == (int(mask.sum()), D)
    torch.testing.assert_close(steered, clean + v, rtol=0, atol=0)
    assert hooks_installed(model) == 0


def test_selectors_pick_tokens_under_left_padding(model: torch.nn.Module) -> None:
    ids, mask = left_pad(PROMPTS)
    h = forward(model, ids, mask)[2]  # resid_post of layer 1
    n_pad = (mask == 0).sum(-1)
    site = "blocks.1.hook_resid_post"
    with (
        record(model, [site], select={"positions": [-1]}) as last,
        record(model, [site], select={"positions": [0]}) as first,
    ):
        forward(model, ids, mask)
    torch.testing.assert_close(last[site], h[:, -1], rtol=0, atol=0)  # left padding: last column = last prompt token
    assert last.rows.tolist() == [0, 1, 2]
    assert last.positions.tolist() == [len(p) - 1 for p in PROMPTS]
    torch.testing.assert_close(first[site], h[torch.arange(3), n_pad], rtol=0, atol=0)
    assert first.positions.tolist() == [0, 0, 0]

    with record(model, [(1, "resid_post")]) as every, record(model, [site], select={"window": [1, 3]}) as window:
        forward(model, ids, mask)
    torch.testing.assert_close(every[site], h[mask.bool()], rtol=0, atol=0)  # padding is never recorded
    assert window.positions.tolist() == [1, 2, 1, 2, 1, 2]
    assert window.rows.tolist() == [0, 0, 1, 1, 2, 2]
    assert bool(every.is_prompt.all())


def test_resid_pre_of_a_layer_is_resid_post_of_the_previous(model: torch.nn.Module) -> None:
    ids, mask = left_pad(PROMPTS)
    hs = forward(model, ids, mask)
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    sites += ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    with record(model, sites) as rec:
        forward(model, ids, mask)
    real = mask.bool()
    for layer in range(3):
        torch.testing.assert_close(rec[(layer, "resid_pre")], hs[layer][real], rtol=0, atol=0)
    for layer in range(2):
        torch.testing.assert_close(rec[(layer, "resid_post")], hs[layer + 1][real], rtol=0, atol=0)
    # transformers applies the final norm to the last entry of hidden_states; the recording is before it.
    with torch.no_grad():
        final_norm = model.get_submodule("model.norm")
        torch.testing.assert_close(final_norm(rec[(2, "resid_post")]), hs[3][real], rtol=0, atol=1e-6)
    for layer in (1, 2):
        assert torch.equal(rec[(layer, "resid_pre")], rec[(layer - 1, "resid_post")])


def test_generate_marks_prompt_and_generated_tokens(model: torch.nn.Module) -> None:
    ids, mask = left_pad(PROMPTS[:2])
    site = "blocks.1.hook_resid_post"
    with record(model, [site]) as rec:
        seqs = generate(model, ids, mask)
    plens = [len(p) for p in PROMPTS[:2]]
    # The prompt step, then one token per row for each generated token fed back (the last is never fed).
    assert rec[site].shape == (sum(plens) + 2 * (NEW - 1), D)
    prompt_step = rec.steps == 0
    assert bool(rec.is_prompt[prompt_step].all()) and not bool(rec.is_prompt[~prompt_step].any())
    assert rec.positions[prompt_step].tolist() == list(range(plens[0])) + list(range(plens[1]))
    gen_rows, gen_pos = rec.rows[~prompt_step], rec.positions[~prompt_step]
    for r in range(2):
        assert gen_pos[gen_rows == r].tolist() == list(range(plens[r], plens[r] + NEW - 1))
    assert rec.steps[~prompt_step].tolist() == [s for s in range(1, NEW) for _ in range(2)]
    # Replaying the finished sequences in one forward gives the same activations at the same (row, position).
    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], dim=1)
    h = forward(model, seqs, full_mask)[2]
    col = rec.positions + (full_mask == 0).sum(-1)[rec.rows]
    torch.testing.assert_close(rec[site], h[rec.rows, col], atol=1e-5, rtol=1e-5)


def test_on_step_streams_and_keep_false_keeps_nothing(model: torch.nn.Module) -> None:
    ids, mask = left_pad(PROMPTS[:2])
    sites = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    streamed: list[tuple[dict[str, Tensor], Tensor, Tensor]] = []
    with record(model, sites, keep=False, on_step=lambda a, r, p: streamed.append((a, r, p))) as rec:
        generate(model, ids, mask)
    assert len(streamed) == NEW  # one call per forward step
    assert rec[sites[0]].numel() == 0 and rec[sites[1]].numel() == 0
    assert rec.rows.numel() == 0 and rec.positions.numel() == 0 and rec.is_prompt.numel() == 0
    with record(model, sites) as kept:
        generate(model, ids, mask)
    for s in sites:
        torch.testing.assert_close(torch.cat([a[s] for a, _, _ in streamed]), kept[s], rtol=0, atol=0)
    assert torch.cat([r for _, r, _ in streamed]).tolist() == kept.rows.tolist()
    assert torch.cat([p for _, _, p in streamed]).tolist() == kept.positions.tolist()


@pytest.mark.parametrize(
    ("site", "message"),
    [
        ("blocks.3.hook_resid_post", "layer 3 out of range: model has 3 layers"),
        ("blocks.1.hook_resid_mid", "unknown site 'resid_mid'"),
        ("resid_post", "give a TransformerLens name"),
    ],
)
def test_bad_sites_are_named(model: torch.nn.Module, site: str, message: str) -> None:
    before = n_hooks(model)
    with pytest.raises(ValueError, match=message), record(model, [site]):
        pass
    assert n_hooks(model) == before  # nothing left behind


def n_hooks(model: torch.nn.Module) -> int:
    """Every forward hook on the model (transformers installs some of its own)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
