"""``refuse`` in ``prefill`` mode: a flagged row's reply starts with the message and the model writes the rest."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import ValidationError
from tiny_models import EOS_ID, tiny_model, word_tokenizer
from transformers import LogitsProcessorList

from steerlib import SteeringConfig, hooks_installed, steer
from steerlib.hf.generate import generate
from steerlib.hf.refusal import ForcedRefusal, refusals
from steerlib.refusal import forced_token, refusal_ids

D = 64
PROMPTS = ["w10 w11 w12 w13", "w50 w60 w70", "w90 w91"]
PREFIX = "w100 w101 w102"
PREFIX_IDS = [100, 101, 102]
N_NEW = 8


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model("llama", n_layers=3)


def refuse(mode: str = "prefill") -> dict[str, Any]:
    when = {"vector": [1.0] * D, "above": -1e9, "scope": "prompt"}  # fires on every prompt
    return {"op": "refuse", "layer": 1, "message": PREFIX, "name": "probe", "mode": mode, "apply": {"when": when}}


def push() -> dict[str, Any]:
    v = torch.randn(D, generator=torch.Generator().manual_seed(5)) * 4
    return {"op": "add", "layer": 1, "vector": v.tolist(), "apply": {"tokens": "all"}}


def cfg(*interventions: dict[str, Any]) -> SteeringConfig:
    return SteeringConfig.model_validate({"interventions": list(interventions)})


def new_ids(model: torch.nn.Module, ids_BT: torch.Tensor, config: list[SteeringConfig | None] | None,
            n: int) -> torch.Tensor:  # fmt: skip
    """Greedy continuation ids, end of turn suppressed so every row runs ``n`` tokens."""
    kwargs: dict[str, Any] = {"max_new_tokens": n, "min_new_tokens": n, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        if config is None:
            return model.generate(input_ids=ids_BT, **kwargs)[:, ids_BT.shape[1] :]  # type: ignore[operator]
        with steer(model, config) as handle:
            forced = LogitsProcessorList([ForcedRefusal(handle, word_tokenizer())])
            seq = model.generate(input_ids=ids_BT, logits_processor=forced, **kwargs)  # type: ignore[operator]
        return seq[:, ids_BT.shape[1] :]


def prompt_ids(text: str) -> torch.Tensor:
    return word_tokenizer()([text], return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("others", [(), (push(),)], ids=["prefill-only", "prefill-and-add"])
def test_flagged_row_starts_with_the_prefix_then_the_steered_model_continues(
    model: torch.nn.Module, others: tuple[dict[str, Any], ...]
) -> None:
    ids = prompt_ids("w5 w6")
    out = new_ids(model, ids, [cfg(refuse(), *others)], N_NEW)[0].tolist()
    assert out[:3] == PREFIX_IDS
    # the rest is exactly what the model, steered by the other ops alone, writes after prompt + prefix
    with_prefix = torch.cat([ids, torch.tensor([PREFIX_IDS])], dim=1)
    rest = new_ids(model, with_prefix, [cfg(*others)] if others else None, N_NEW - 3)[0].tolist()
    assert out[3:] == rest and EOS_ID not in out
    assert hooks_installed(model) == 0


def test_the_add_op_changes_the_continuation(model: torch.nn.Module) -> None:
    ids = prompt_ids("w5 w6")
    alone = new_ids(model, ids, [cfg(refuse())], N_NEW)[0].tolist()
    steered = new_ids(model, ids, [cfg(refuse(), push())], N_NEW)[0].tolist()
    assert alone[:3] == steered[:3] == PREFIX_IDS and alone[3:] != steered[3:]


def test_prefill_without_min_tokens_may_end_but_never_inside_the_prefix(model: torch.nn.Module) -> None:
    tok = word_tokenizer()
    out = generate(model, tok, PROMPTS, cfg(refuse()), max_new_tokens=N_NEW, min_new_tokens=0)
    for o in out:
        assert o.text.startswith(PREFIX) and o.refused_by == "probe"
        assert o.n_new_tokens > 3  # the model wrote past the prefix (message mode would stop at 3 words + eot)


def test_unflagged_rows_are_identical_to_an_unsteered_run(model: torch.nn.Module) -> None:
    tok = word_tokenizer()
    plain = generate(model, tok, PROMPTS, max_new_tokens=N_NEW, min_new_tokens=0)
    out = generate(model, tok, PROMPTS, [None, cfg(refuse(), push()), None], max_new_tokens=N_NEW, min_new_tokens=0)
    assert [o.refused_by for o in out] == [None, "probe", None]
    assert (out[0], out[2]) == (plain[0], plain[2])
    assert out[1].text.startswith(PREFIX) and out[1].text != PREFIX


def test_message_mode_is_the_default_and_unchanged(model: torch.nn.Module) -> None:
    ids = prompt_ids("w5 w6")
    default = {k: v for k, v in refuse().items() if k != "mode"}
    assert cfg(default).interventions[0].mode == "message"  # type: ignore[union-attr]
    for c in (cfg(default), cfg(refuse("message"))):
        assert new_ids(model, ids, [c], 6)[0].tolist()[:4] == [*PREFIX_IDS, EOS_ID]


def test_refusals_report_the_mode(model: torch.nn.Module) -> None:
    with steer(model, [cfg(refuse()), cfg(refuse("message"))]) as handle, torch.no_grad():
        model(**word_tokenizer()(["w5 w6", "w7 w8"], return_tensors="pt"))
        fired = refusals(handle)
    assert {r: f.mode for r, f in fired.items()} == {0: "prefill", 1: "message"}


def test_unknown_mode_names_the_field_and_the_choices() -> None:
    with pytest.raises(ValidationError, match=r"(?s)mode.*'message' or 'prefill'"):
        cfg(refuse("prefix"))


def test_the_forced_tokens_rule_shared_by_hf_and_vllm() -> None:
    tok = word_tokenizer()
    assert refusal_ids(tok, PREFIX, "prefill") == PREFIX_IDS
    assert refusal_ids(tok, PREFIX, "message") == [*PREFIX_IDS, EOS_ID]
    # a message reply repeats end-of-turn until the engine stops the row; a prefill reply is free after its message
    message = [forced_token([*PREFIX_IDS, EOS_ID], s, prefill=False) for s in range(6)]
    assert message == [100, 101, 102, EOS_ID, EOS_ID, EOS_ID]
    assert [forced_token(PREFIX_IDS, s, prefill=True) for s in range(5)] == [100, 101, 102, None, None]
    assert forced_token([], 0, prefill=False) is None
