"""The vLLM backend's per-step bookkeeping and steerable layers, without vLLM: batch rows, groups, the residual sum,
slots, cache salts, finished requests; sites of layers shaped like vLLM's native ones and like transformers' own.

``SteeringState`` is fed what vLLM's logits-processor interface and attention metadata report; these tests play
that role on a tiny width so the mechanics are checked in the plain test environment too.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from steerlib.plan import ModelSpec
from steerlib.vllm import capture, verdicts
from steerlib.vllm import state as steering_state
from steerlib.vllm.families import RESIDUAL_SITES, Family
from steerlib.vllm.layers import make_steerable
from steerlib.vllm.params import cache_salt, parse_steering, steering_args
from steerlib.vllm.state import SteeringState

D = 8
SPEC = ModelSpec(n_layers=2, d_model=D, device=torch.device("cpu"), dtype=torch.float32)


def _add(vec: list[float], **apply: Any) -> dict[str, Any]:
    iv: dict[str, Any] = {"op": "add", "layer": 1, "vector": vec}
    if apply:
        iv["apply"] = apply
    return {"steering": {"interventions": [iv]}}


def _onehot(i: int, scale: float = 1.0) -> list[float]:
    return [scale if j == i else 0.0 for j in range(D)]


def _step(st: SteeringState, positions: list[int], qsl: list[int]) -> None:
    st.begin_step(torch.arange(len(positions)), torch.tensor(positions), torch.tensor(qsl))


def test_each_row_gets_its_own_steering_on_the_residual_sum() -> None:
    st = SteeringState(SPEC, capacity=4)
    st.add(0, _add(_onehot(0)), prompt_len=3)
    st.add(1, None, prompt_len=1)
    st.add(2, _add(_onehot(1)), prompt_len=2)
    _step(st, [0, 1, 2, 5, 0, 1], [0, 3, 4, 6])
    h, r = torch.randn(6, D), torch.randn(6, D)
    out = st.run(1, "resid_post", h, r)
    want = h + r
    want[:3, 0] += 1.0
    want[4:, 1] += 1.0
    torch.testing.assert_close(out + r, want)
    assert torch.equal(out[3], h[3])  # the unsteered request is bit-identical
    assert torch.equal(st.run(0, "resid_post", h, r), h)  # no op at layer 0


def test_generated_only_policy_uses_prompt_length_and_position() -> None:
    st = SteeringState(SPEC, capacity=2)
    st.add(0, _add(_onehot(0), tokens="generated"), prompt_len=3)
    _step(st, [0, 1, 2], [0, 3])  # prefill
    x = torch.zeros(3, D)
    assert torch.equal(st.run(1, "resid_post", x, None), x)
    _step(st, [3], [0, 1])  # first generated token fed back
    assert st.run(1, "resid_post", torch.zeros(1, D), None)[0, 0] == 1.0


def test_rows_move_and_plans_are_freed_with_their_last_request() -> None:
    st = SteeringState(SPEC, capacity=2)
    st.add(0, _add(_onehot(0)), prompt_len=1)
    st.add(1, _add(_onehot(0)), prompt_len=1)
    assert len(st.plans) == 1 and st.plans[next(iter(st.plans))].users == 2
    st.move(1, 0, swap=False)  # vLLM condensing: row 1 replaces row 0, whose request is gone
    assert list(st.rows) == [0] and st.plans[next(iter(st.plans))].users == 1
    st.remove(0)
    assert not st.plans and not st.rows
    st.add(0, _add(_onehot(0)), prompt_len=1)
    st.add(1, None, prompt_len=1)
    st.move(0, 1, swap=True)
    assert list(st.rows) == [1]


def test_prompt_scoped_gate_holds_per_request_and_resets_for_a_new_one() -> None:
    probe = {"vector": _onehot(7), "above": 0.5, "scope": "prompt"}
    args = _add(_onehot(0), when=probe)
    st = SteeringState(SPEC, capacity=1)
    st.add(0, args, prompt_len=2)
    x = torch.zeros(2, D)
    x[1, 7] = 1.0  # the last prompt token fires the probe
    _step(st, [0, 1], [0, 2])
    st.run(1, "resid_post", x, None)
    _step(st, [2], [0, 1])
    assert st.run(1, "resid_post", torch.zeros(1, D), None)[0, 0] == 1.0  # verdict held while decoding
    st.add(0, args, prompt_len=2)  # a new request takes the slot: its prompt does not fire
    _step(st, [0, 1], [0, 2])
    st.run(1, "resid_post", torch.zeros(2, D), None)
    _step(st, [2], [0, 1])
    assert st.run(1, "resid_post", torch.zeros(1, D), None)[0, 0] == 0.0


class _CharTokenizer:
    """One token per character (ids = code points), end-of-turn 0: enough to check which ids get forced."""

    eos_token_id = 0

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [ord(c) for c in text]


def test_refuse_forces_the_message_on_flagged_rows_once_the_prompt_is_read() -> None:
    when = {"vector": _onehot(7), "above": 0.5, "scope": "prompt"}
    refuse = {"op": "refuse", "layer": 1, "message": "No.", "apply": {"when": when}}
    st = SteeringState(SPEC, capacity=3, load_tokenizer=_CharTokenizer)
    for row in (0, 1):
        st.add(row, {"steering": {"interventions": [refuse]}}, prompt_len=3)
    st.add(2, None, prompt_len=1)
    assert st.refusing()
    _step(st, [0, 1, 0, 1, 0], [0, 2, 4, 5])  # a first chunk of both prompts: nothing decided yet
    st.run(1, "resid_post", torch.zeros(5, D), None)
    assert st.forced_tokens() == {}
    x = torch.zeros(3, D)
    x[0, 7] = 1.0  # row 0's last prompt token fires the detector, row 1's does not
    _step(st, [2, 2, 1], [0, 1, 2, 3])
    st.run(1, "resid_post", x, None)
    assert st.forced_tokens() == {0: ord("N")}
    got = [st.forced_tokens() for _ in range(4)]
    assert got == [{0: ord("o")}, {0: ord(".")}, {0: 0}, {0: 0}]  # the message, then end-of-turn
    st.remove(0)
    assert st.refusing() and st.forced_tokens() == {}  # row 1 still refuses nothing


def test_refuse_in_prefill_mode_forces_the_message_without_end_of_turn() -> None:
    when = {"vector": _onehot(7), "above": 0.5, "scope": "prompt"}
    refuse = {"op": "refuse", "layer": 1, "message": "No.", "mode": "prefill", "apply": {"when": when}}
    st = SteeringState(SPEC, capacity=1, load_tokenizer=_CharTokenizer)
    st.add(0, {"steering": {"interventions": [refuse]}}, prompt_len=2)
    x = torch.zeros(2, D)
    x[1, 7] = 1.0
    _step(st, [0, 1], [0, 2])
    st.run(1, "resid_post", x, None)
    got = [st.forced_tokens() for _ in range(5)]
    assert got == [{0: ord("N")}, {0: ord("o")}, {0: ord(".")}, {}, {}]  # then the model writes on


def test_cache_salt_separates_steerings_and_isolates_unstable_ones() -> None:
    a = parse_steering(_add(_onehot(0)))
    b = parse_steering(_add(_onehot(1)))
    gen = parse_steering(_add(_onehot(0), tokens="generated"))
    assert a is not None and b is not None and gen is not None
    assert cache_salt(a, "r1") == cache_salt(a, "r2")  # same steering: blocks can be shared
    assert cache_salt(a, "r1") != cache_salt(b, "r1")
    assert cache_salt(a, "r1", "user") != cache_salt(a, "r1")
    assert cache_salt(gen, "r1") != cache_salt(gen, "r2")  # depends on prompt/generated: never shared
    assert parse_steering(steering_args(a)) == a
    assert parse_steering({"steering": '{"interventions": []}'}) is not None  # JSON string, as in vllm_xargs
    assert parse_steering({"other": 1}) is None


class _Params:
    """Stands for the ``SamplingParams`` vLLM's model runner holds while a request lives."""


def test_unscheduled_request_keeps_its_verdict_and_a_finished_one_is_freed() -> None:
    """vLLM drops a request from its batch for a step it is not scheduled in, then adds it back (same output list);
    the request is finished once vLLM lets go of its params."""
    args = _add(_onehot(0), when={"vector": _onehot(7), "above": 0.5, "scope": "prompt"})
    st = SteeringState(SPEC, capacity=2)
    owner: list[int] = []
    params = _Params()
    st.add(0, args, prompt_len=2, owner=owner, lifetime=params)
    x = torch.zeros(2, D)
    x[1, 7] = 1.0
    _step(st, [0, 1], [0, 2])
    st.run(1, "resid_post", x, None)
    st.remove(0)  # not scheduled this step
    assert not st.rows and len(st.parked) == 1 and st.plans
    st.add(0, args, prompt_len=2, owner=owner, lifetime=params)  # back again
    _step(st, [2], [0, 1])
    assert st.run(1, "resid_post", torch.zeros(1, D), None)[0, 0] == 1.0
    st.remove(0)
    _step(st, [0], [0, 1])
    assert len(st.parked) == 1 and st.plans  # out of the batch but alive: its slot is kept
    del params  # vLLM lets go of a finished request: its plan and slot are freed at the next step
    _step(st, [0], [0, 1])
    assert not st.parked and not st.plans and len(st._free_slots) == 2


def test_a_request_that_finishes_in_the_batch_is_freed_when_removed() -> None:
    st = SteeringState(SPEC, capacity=1)
    params, owner = _Params(), [0]
    st.add(0, _add(_onehot(0)), prompt_len=1, owner=owner, lifetime=params)
    del params  # finished while in its row (vLLM reports the removal at its next step)
    st.remove(0)
    assert not st.parked and not st.plans and st._free_slots == [0]


def test_a_site_the_family_lacks_is_refused_naming_family_and_site() -> None:
    st = SteeringState(SPEC, capacity=1, family=Family("Qwen2-MoE", RESIDUAL_SITES))
    attn = {"steering": {"interventions": [{"op": "add", "layer": 1, "site": "attn_out", "vector": _onehot(0)}]}}
    with pytest.raises(ValueError, match="site attn_out is not available on Qwen2-MoE models in vLLM; it has resid"):
        st.add(0, attn, prompt_len=1)
    st.add(0, _add(_onehot(0)), prompt_len=1)  # resid_post is fine
    assert list(st.rows) == [0]


# -- steerable layers (steerlib.vllm.layers) on toy modules shaped like vLLM's and transformers' --------------------


class _Attn(nn.Module):
    def __init__(self, tuple_out: bool = False) -> None:
        super().__init__()
        self.o_proj = nn.Linear(D, D)
        self.tuple_out = tuple_out

    def forward(self, positions: Any = None, hidden_states: Any = None) -> Any:
        out = self.o_proj(hidden_states)
        return (out, None) if self.tuple_out else out


class _Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down_proj = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.down_proj(x))


class _TwoStreamLayer(nn.Module):
    """As vLLM's native layers: takes and returns (hidden, residual), the residual stream being their sum."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.mlp = _Attn(), _Mlp()

    def forward(self, positions: Any, hidden_states: Any, residual: Any) -> tuple[Any, Any]:
        stream = hidden_states if residual is None else hidden_states + residual
        stream = stream + self.self_attn(positions=positions, hidden_states=stream * 0.5)
        return self.mlp(stream * 0.5), stream


class _OneStreamLayer(nn.Module):
    """As transformers' layers (vLLM's Transformers backend): [1, tokens, d] in and out; attention returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.self_attn, self.mlp = _Attn(tuple_out=True), _Mlp()

    def forward(self, hidden_states: Any, attention_mask: Any = None) -> Any:
        h = hidden_states + self.self_attn(hidden_states=hidden_states)[0]
        return h + self.mlp(h)


class _Model(nn.Module):
    def __init__(self, layer: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([layer() for _ in range(2)])

    def forward(self, x: Any) -> Any:
        if isinstance(self.layers[0], _TwoStreamLayer):
            hidden, residual = x, None
            for layer in self.layers:
                hidden, residual = layer(None, hidden, residual)
            return hidden + residual
        for layer in self.layers:
            x = layer(x)
        return x


class _Recorder:
    """Stands for the worker's SteeringState: records what each site sees and adds ``shift`` to it."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift
        self.seen: list[tuple[int, str, torch.Tensor, torch.Tensor | None]] = []

    def run(self, layer: int, site: str, x: torch.Tensor, other: torch.Tensor | None) -> torch.Tensor:
        self.seen.append((layer, site, x.clone(), None if other is None else other.clone()))
        return x + self.shift


@pytest.fixture
def recorder() -> Iterator[_Recorder]:
    rec = _Recorder()
    steering_state._STATE[:] = [rec]  # type: ignore[list-item]
    try:
        yield rec
    finally:
        steering_state._STATE[:] = []


ORDER = ["resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post"]


@pytest.mark.parametrize("layer", [_TwoStreamLayer, _OneStreamLayer])
def test_steerable_layers_keep_names_and_outputs_and_pass_every_site(layer: type, recorder: _Recorder) -> None:
    model = _Model(layer)
    x = torch.randn(1, 5, D) if layer is _OneStreamLayer else torch.randn(5, D)
    names, plain = list(model.state_dict()), model(x)
    assert make_steerable(model, Family("Toy"), n_layers=2) == 2
    assert list(model.state_dict()) == names and type(model.layers[0]).__name__ == f"Steerable{layer.__name__}"
    assert torch.equal(model(x), plain)  # the op copies when nothing is steered
    assert [(i, s) for i, s, _, _ in recorder.seen] == [(i, s) for i in range(2) for s in ORDER]
    assert all(seen.shape == (5, D) for _, _, seen, _ in recorder.seen)  # [1, tokens, d] reaches the op flat
    by_site = {(i, s): (seen, other) for i, s, seen, other in recorder.seen}
    torch.testing.assert_close(by_site[1, "mlp_out"][1], by_site[1, "mlp_in"][0])  # mlp_out reads mlp_in
    if layer is _TwoStreamLayer:  # the residual travels beside the hidden state: the op gets both
        assert by_site[0, "resid_pre"][1] is None and by_site[1, "resid_pre"][1] is not None
        pre1, res1 = by_site[1, "resid_pre"]
        assert res1 is not None
        torch.testing.assert_close(pre1 + res1, model.layers[0](None, x, None)[0] + model.layers[0](None, x, None)[1])


def test_a_steered_site_changes_the_stream_downstream(recorder: _Recorder) -> None:
    model = _Model(_TwoStreamLayer)
    make_steerable(model, Family("Toy", ("resid_pre", "resid_post")), n_layers=2)
    x = torch.randn(3, D)
    plain = model(x)
    assert [s for _, s, _, _ in recorder.seen] == ["resid_pre", "resid_post"] * 2  # only the family's sites
    recorder.shift = 1.0
    assert not torch.allclose(model(x), plain)


def test_an_instance_bound_forward_stays_the_one_that_runs(recorder: _Recorder) -> None:
    """vLLM's Transformers backend rewrites some modules' forward per instance (its fusers)."""
    model = _Model(_OneStreamLayer)
    for layer in model.layers:
        mlp = layer.get_submodule("mlp")
        mlp.forward = types.MethodType(lambda self, x: torch.tanh(self.down_proj(x)) * 2, mlp)
    x = torch.randn(1, 4, D)
    fused = model(x)
    make_steerable(model, Family("Toy"), n_layers=2)
    assert torch.equal(model(x), fused) and (1, "mlp_out") in {(i, s) for i, s, _, _ in recorder.seen}


def test_make_steerable_is_all_or_none() -> None:
    model = _Model(_TwoStreamLayer)
    with pytest.raises(ValueError, match="Toy layer _TwoStreamLayer has no 'ffn' module; it has self_attn, mlp"):
        make_steerable(model, Family("Toy", mlp="ffn"), n_layers=2)
    assert type(model.layers[0]) is _TwoStreamLayer and type(model.layers[0].self_attn) is _Attn
    with pytest.raises(ValueError, match=r"no decoder layers found in _Model \(Toy\): no nn.ModuleList of 3 layers"):
        make_steerable(model, Family("Toy"), n_layers=3)


def _reads(sites: list[list[Any]], tag: str) -> dict[str, Any]:
    return {capture.CAPTURE_KEY: sites, verdicts.TAG_KEY: tag}


def test_rows_that_read_hand_back_their_tokens_after_steering(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two reading rows (one steered at the site it reads, one not) beside a steered row that does not read: each
    reader's file holds exactly its own tokens at its sites, with positions, after the site's steering; a row moved
    in the batch keeps reading its own tokens."""
    monkeypatch.setenv(verdicts.VERDICTS_ENV, str(tmp_path))
    a, b = "a" * 32, "b" * 32
    st = SteeringState(SPEC, capacity=4)
    st.add(0, _add(_onehot(0)) | _reads([[1, "resid_post"]], a), prompt_len=3)
    st.add(1, _add(_onehot(1)), prompt_len=1)
    st.add(2, _reads([[1, "resid_post"], [0, "mlp_out"]], b), prompt_len=2)
    assert st.active
    _step(st, [0, 1, 2, 0, 0, 1], [0, 3, 4, 6])
    h, r = torch.randn(6, D), torch.randn(6, D)
    out = st.run(1, "resid_post", h, r)
    m = torch.randn(6, D)
    assert torch.equal(st.run(0, "mlp_out", m, torch.randn(6, D)), m)  # read, not steered: untouched
    st.move(2, 1, swap=True)  # the reader b now sits in row 1, the steered row in row 2
    _step(st, [3, 2, 1], [0, 1, 2, 3])
    h2, r2 = torch.randn(3, D), torch.randn(3, D)
    out2 = st.run(1, "resid_post", h2, r2)
    got_a, got_b = capture.take(tmp_path, a), capture.take(tmp_path, b)
    assert set(got_a) == {"blocks.1.hook_resid_post"} and set(got_b) == {
        "blocks.1.hook_resid_post",
        "blocks.0.hook_mlp_out",
    }
    (pa1, xa1), (pa2, xa2) = got_a["blocks.1.hook_resid_post"]
    assert pa1.tolist() == [0, 1, 2] and pa2.tolist() == [3]
    torch.testing.assert_close(xa1, (out + r)[:3])  # the stream after the add
    torch.testing.assert_close(xa2, (out2 + r2)[:1])
    assert xa1[:, 0].sub((h + r)[:3, 0]).allclose(torch.ones(3))
    (pb1, xb1), (pb2, xb2) = got_b["blocks.1.hook_resid_post"]
    assert pb1.tolist() == [0, 1] and pb2.tolist() == [2]
    torch.testing.assert_close(xb1, (h + r)[4:])
    torch.testing.assert_close(xb2, (h2 + r2)[1:2])
    ((pm, xm),) = got_b["blocks.0.hook_mlp_out"]
    assert pm.tolist() == [0, 1] and torch.equal(xm, m[4:])
    assert capture.take(tmp_path, a) == {}  # taken once: the file is gone
    st.remove(0)
    st.remove(1)
    st.remove(2)
    assert not st.active


def test_a_read_without_the_servers_folder_or_with_a_bad_list_is_refused(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(verdicts.VERDICTS_ENV, raising=False)
    st = SteeringState(SPEC, capacity=2)
    with pytest.raises(RuntimeError, match="no server folder"):
        st.add(0, _reads([[0, "resid_post"]], "c" * 32), prompt_len=1)
    monkeypatch.setenv(verdicts.VERDICTS_ENV, str(tmp_path))
    with pytest.raises(RuntimeError, match="no server folder"):
        st.add(0, _reads([[0, "resid_post"]], "../../etc/passwd"), prompt_len=1)  # not a tag: nothing written
    for bad in ([[0, "resid_middle"]], [[-1, "resid_post"]], "resid_post", [[0]]):
        with pytest.raises(ValueError, match="steerlib_capture"):
            capture.sites_of({capture.CAPTURE_KEY: bad})
    assert capture.sites_of({capture.CAPTURE_KEY: [[1, "mlp_out"], [1, "mlp_out"]]}) == ((1, "mlp_out"),)
    assert list(tmp_path.iterdir()) == []
