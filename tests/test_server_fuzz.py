"""Property-based fuzzing of the request schema against the running server on a tiny model (hypothesis).

Generated requests, valid and invalid (numeric extremes, huge lists, unicode, unknown fields, garbage JSON, every
steering op with good and bad fields, streamed or not), are sent a few at a time together with a control request.
Properties: no 5xx ever; every 4xx in OpenAI's error shape; every 200 a well-formed answer (a stream ends with
``[DONE]``, and only a row's own ``non_finite`` error may end it early); the control request, sharing batches with
the fuzzed ones, always answers exactly as it did alone.

CI runs ``STEERLIB_FUZZ_EXAMPLES`` examples (default 200, about a minute); run thousands locally::

    STEERLIB_FUZZ_EXAMPLES=3000 python -m pytest -q tests/test_server_fuzz.py -s
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_support import MODEL_NAME, D, make_app, make_presets, serving, words
from tiny_models import tiny_model

EXAMPLES = int(os.environ.get("STEERLIB_FUZZ_EXAMPLES", "200"))
CONTROL = {
    "model": MODEL_NAME,
    "messages": [{"role": "user", "content": words(30, 31, 32)}],
    "max_tokens": 4,
    "temperature": 0,
    "steering": ["push"],
}
SENT: list[int] = []
"""Fuzzed requests sent per example (reported at the end of a run with ``-s``)."""
STATUS: Counter[str] = Counter()
"""Answers by status (and stream or not)."""

# -- strategies -----------------------------------------------------------------------------------------------------

EXTREMES = [0, 1, -1, 2, 3, 63, 64, 2**31, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, 1e-39, 1e-3, 1e12, 1e13,
            1e300, 5e-324, -0.0, float("nan"), float("inf"), float("-inf")]  # fmt: skip
numbers = st.one_of(
    st.sampled_from(EXTREMES),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 300),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-10, 10),
)
names = st.one_of(
    st.sampled_from(["push", "erase", "sae_edit", "probe", "gate", "nope", "../push", "/etc/passwd", "push\n", ""]),
    st.text(max_size=12),
)
text = st.one_of(
    st.text(max_size=40), st.just(words(10, 11, 12)), st.builds(lambda n: "w10 " * n, st.integers(0, 3000))
)
junk = st.recursive(
    st.none() | st.booleans() | numbers | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)
floats_or_junk = st.one_of(st.floats(-5, 5), numbers)
vectors = st.one_of(
    st.lists(st.floats(-5, 5), min_size=D, max_size=D),
    st.lists(floats_or_junk, max_size=70),
    st.builds(lambda n, x: [x] * n, st.integers(0, 70_000), floats_or_junk),
    names,
    st.fixed_dictionaries({"preset_vector": names}),
    junk,
)
layers = st.one_of(
    st.integers(-2, 4), st.just("all"), st.lists(st.integers(-1, 4), max_size=5),
    st.builds(lambda n: [0] * n, st.integers(0, 30_000)), numbers, junk,
)  # fmt: skip
selectors = st.fixed_dictionaries(
    {},
    optional={
        "tokens": st.sampled_from(["all", "prompt", "generated", "none"]),
        "positions": st.one_of(st.lists(numbers, max_size=6), st.builds(lambda n: list(range(n)), st.integers(0, 600))),
        "window": st.one_of(st.tuples(numbers, st.none() | numbers).map(list), junk),
        "last": numbers,
        "match": st.one_of(st.lists(st.text(max_size=5), max_size=5), st.lists(st.just("w10"), max_size=400)),
    },
)
conditions = st.fixed_dictionaries(
    {},
    optional={
        "feature": numbers, "sae": names, "vector": vectors, "probe": names,
        "metric": st.sampled_from(["dot", "cosine", "l2"]), "above": numbers, "below": numbers,
        "scope": st.sampled_from(["token", "prompt", "row"]), "aggregate": st.sampled_from(["last", "mean", "max"]),
    },
)  # fmt: skip
applies = st.one_of(
    selectors, st.builds(lambda s, w, e: s | {"when": w, "exclude": e}, selectors, conditions, selectors)
)
edits = st.lists(
    st.fixed_dictionaries(
        {"feature": numbers, "mode": st.sampled_from(["set", "scale", "add", "mul"]), "value": numbers}
    ),
    max_size=4,
)
interventions = st.fixed_dictionaries(
    {"op": st.sampled_from(["add", "ablate", "sae", "replace", "refuse", "python"])},
    optional={
        "layer": layers, "site": st.sampled_from(["resid_post", "resid_pre", "mlp_out", "attn_out", "mlp_in", "x",
                                                  "blocks.1.hook_resid_post"]),
        "vector": vectors, "coefficient": numbers, "relative": st.booleans(), "norm_match": st.booleans(),
        "sae": names, "edits": edits, "error_term": st.sampled_from(["keep", "drop"]), "any_site": st.booleans(),
        "message": st.text(max_size=30), "name": st.text(max_size=10), "mode": st.sampled_from(["message", "prefill"]),
        "apply": applies, "hook": junk,
    },
)  # fmt: skip
steering = st.one_of(
    st.lists(names, max_size=4),
    st.fixed_dictionaries({}, optional={"presets": st.lists(names, max_size=3),
                                        "interventions": st.lists(interventions, max_size=4)}),
    junk,
)  # fmt: skip
messages = st.one_of(
    st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool"]), "content": text}),
             min_size=1, max_size=3),
    junk,
)  # fmt: skip
common = {
    "max_tokens": st.one_of(st.integers(1, 4), numbers), "temperature": numbers, "top_p": numbers, "seed": numbers,
    "stop": st.one_of(st.text(max_size=6), st.lists(st.text(max_size=200), max_size=6)), "stream": st.booleans(),
    "steering": steering, "steering_audit": st.booleans(), "n": numbers, "logit_bias": junk,
    "user": st.text(max_size=8), "frequency_penalty": numbers, "extra_field": junk,
}  # fmt: skip
model = st.sampled_from([MODEL_NAME] * 6 + ["gpt-4", ""])

# Requests that pass validation (values anywhere in their allowed ranges, extremes included), so that most reach
# the engine and share batches with the control request.
ok_vectors = st.one_of(
    st.lists(st.floats(-5, 5), min_size=D, max_size=D),
    st.lists(st.sampled_from([1e12, -1e12, 0.0, 1e-30, 3.0]), min_size=D, max_size=D),
    st.just("push"),
    st.just({"preset_vector": "push"}),
)
ok_scale = st.one_of(st.floats(-1e4, 1e4), st.sampled_from([1e4, -1e4, 0.0, 1e-30]))
ok_selector = st.fixed_dictionaries(
    {},
    optional={
        "tokens": st.sampled_from(["all", "prompt", "generated"]),
        "positions": st.lists(st.integers(-80, 80), max_size=4),
        "window": st.tuples(st.integers(0, 10), st.none() | st.integers(11, 2000)).map(list),
        "last": st.integers(1, 2000),
        "match": st.lists(st.sampled_from(["w10", "w30", "<s>", "x"]), min_size=1, max_size=3),
    },
)
scopes, aggregates = st.sampled_from(["token", "prompt"]), st.sampled_from(["last", "mean", "max"])
ok_when = st.one_of(
    st.fixed_dictionaries(
        {"probe": st.just("gate"), "above": st.floats(-100, 100)}, optional={"scope": scopes, "aggregate": aggregates}
    ),
    st.fixed_dictionaries(
        {"vector": ok_vectors, "below": st.floats(-100, 100)},
        optional={"metric": st.sampled_from(["dot", "cosine"]), "scope": scopes},
    ),
    st.fixed_dictionaries({"feature": st.integers(0, 15), "sae": st.just("probe"), "above": st.floats(-10, 10)}),
)
ok_apply = st.one_of(ok_selector, st.builds(lambda s, w: s | {"when": w}, ok_selector, ok_when))
ok_layer = st.one_of(st.integers(0, 2), st.just("all"), st.lists(st.integers(0, 2), min_size=1, max_size=3))
ok_edits = st.lists(
    st.fixed_dictionaries(
        {"feature": st.integers(0, 15), "mode": st.sampled_from(["set", "scale", "add"]), "value": ok_scale}
    ),
    max_size=3,
)
refuse_when = st.fixed_dictionaries(
    {"probe": st.just("gate"), "above": st.floats(-1e3, 1e3), "scope": st.just("prompt")}
)
ok_interventions = st.one_of(
    st.fixed_dictionaries(
        {"op": st.just("add"), "layer": ok_layer, "vector": ok_vectors},
        optional={"coefficient": ok_scale, "relative": st.booleans(), "norm_match": st.booleans(), "apply": ok_apply},
    ),
    st.fixed_dictionaries(
        {"op": st.just("ablate"), "layer": ok_layer, "vector": ok_vectors}, optional={"apply": ok_apply}
    ),
    st.fixed_dictionaries(
        {"op": st.just("sae"), "sae": st.just("probe")},
        optional={"edits": ok_edits, "error_term": st.sampled_from(["keep", "drop"]), "apply": ok_apply},
    ),
    st.fixed_dictionaries({"op": st.just("replace"), "sae": st.just("probe")}, optional={"apply": ok_selector}),
    st.fixed_dictionaries(
        {"op": st.just("refuse"), "layer": st.integers(0, 2), "message": st.just("w100 w101"),
         "apply": st.fixed_dictionaries({"when": refuse_when})},
        optional={"mode": st.sampled_from(["message", "prefill"])},
    ),
)  # fmt: skip
ok_steering = st.one_of(
    st.none(),
    st.lists(st.sampled_from(["push", "erase", "sae_edit"]), max_size=3),
    st.fixed_dictionaries({}, optional={"presets": st.lists(st.sampled_from(["push", "erase"]), max_size=2),
                                        "interventions": st.lists(ok_interventions, max_size=3)}),
)  # fmt: skip
ok_chat = st.fixed_dictionaries(
    {"model": st.just(MODEL_NAME),
     "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system"]),
                                                 "content": st.one_of(st.text(max_size=30), st.just(words(10, 11)))}),
                          min_size=1, max_size=2)},
    optional={"max_tokens": st.integers(1, 4), "temperature": st.one_of(st.just(0), st.floats(1e-3, 2)),
              "top_p": st.floats(1e-6, 1), "seed": st.integers(-(2**63), 2**63 - 1),
              "stop": st.lists(st.text(min_size=1, max_size=4), max_size=4), "stream": st.booleans(),
              "steering": ok_steering, "steering_audit": st.booleans()},
)  # fmt: skip
chat = st.fixed_dictionaries({"model": model, "messages": messages}, optional=common)
completion = st.fixed_dictionaries(
    {"model": model, "prompt": st.one_of(text, st.lists(st.integers(-5, 200), max_size=8), junk)},
    optional=common | {"echo": st.booleans()},
)
inspect = st.fixed_dictionaries(
    {"sae": names, "prompt": text},
    optional={"response": text, "generate_tokens": st.one_of(st.integers(0, 3), numbers), "k": numbers,
              "chat": st.booleans(), "steering": steering},
)  # fmt: skip
requests = st.one_of(
    st.tuples(st.just("/v1/chat/completions"), ok_chat),
    st.tuples(st.just("/v1/chat/completions"), ok_chat),
    st.tuples(st.just("/v1/chat/completions"), ok_chat),
    st.tuples(st.just("/v1/chat/completions"), chat),
    st.tuples(st.just("/v1/completions"), completion),
    st.tuples(st.just("/v1/features/inspect"), inspect),
    st.tuples(st.sampled_from(["/v1/chat/completions", "/v1/completions"]), junk),
)

# -- the server and the properties ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, str]]:
    presets = make_presets(tmp_path_factory.mktemp("presets"))
    app = make_app(presets, tiny_model("llama", 3), max_tokens_limit=4, max_prompt_tokens=64, batch_wait_ms=5)
    with serving(app) as url, httpx.Client(base_url=url, timeout=120) as client:
        yield client, _answer(client, CONTROL)
    print(f"\nfuzz: {sum(SENT)} fuzzed requests in {len(SENT)} examples, each beside a control request")
    print("fuzz answers:", dict(sorted(STATUS.items())))


def _answer(client: httpx.Client, body: dict[str, Any]) -> str:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def check(path: str, body: Any, r: httpx.Response) -> None:
    streamed = r.headers.get("content-type", "").startswith("text/event-stream")
    STATUS[f"{r.status_code}{' stream' if streamed else ''}"] += 1
    assert r.status_code < 500, (path, body, r.status_code, r.text[:500])
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and isinstance(err["message"], str), r.text
        assert err["message"] and err["type"] != "server_error", r.text
        return
    if streamed:
        _check_stream(r.text)
    elif path != "/v1/features/inspect":
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] in ("stop", "length"), r.text


def _check_stream(text: str) -> None:
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]", text[-300:]
    for e in events[:-1]:
        obj = json.loads(e)
        if "error" in obj:  # only a row's own overflow may end a stream early
            assert obj["error"]["code"] == "non_finite" and obj["error"]["type"] == "invalid_request_error", e


def _send(client: httpx.Client, path: str, body: Any) -> httpx.Response:
    try:
        return client.post(path, json=body)
    except ValueError:  # a body json.dumps cannot write: send it as text
        return client.post(path, content=repr(body), headers={"content-type": "application/json"})


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)
@given(batch=st.lists(requests, min_size=1, max_size=4))
def test_fuzzed_requests_never_5xx_and_never_disturb_a_neighbour(
    server: tuple[httpx.Client, str], batch: list[tuple[str, Any]]
) -> None:
    client, control = server
    with ThreadPoolExecutor(len(batch) + 1) as pool:
        done = [pool.submit(_send, client, path, body) for path, body in batch]
        neighbour = pool.submit(_answer, client, CONTROL)
        for (path, body), fut in zip(batch, done, strict=True):
            check(path, body, fut.result())
        assert neighbour.result() == control
    SENT.append(len(batch))
    assert client.get("/health").json()["status"] == "ok"


def test_fuzz_count_is_reported(server: tuple[httpx.Client, str]) -> None:
    """Runs after the fuzz test (file order): it really sent its requests."""
    assert sum(SENT) >= EXAMPLES
