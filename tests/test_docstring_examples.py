"""The examples in the public API's docstrings run as written (doctest, on tiny random models built in the example).

``steer``, ``attach``, ``record`` (in its module's docstring, which keeps the function short), ``load_sae`` and
``SteeringConfig`` each show a runnable use, as steering-vectors' ``record_activations`` does; this test runs them (the
same as ``pytest --doctest-modules`` on those docstrings, with no option flags beyond the examples' own directives).
"""

from __future__ import annotations

import doctest
import inspect

import pytest

import steerlib
import steerlib.hf.recording

PUBLIC: dict[str, object] = {
    "steer": steerlib.steer,
    "attach": steerlib.attach,
    "record": steerlib.hf.recording,
    "load_sae": steerlib.load_sae,
    "SteeringConfig": steerlib.SteeringConfig,
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_the_docstring_example_runs(name: str) -> None:
    obj = PUBLIC[name]
    tests = [
        t for t in doctest.DocTestFinder(recurse=False).find(obj, name, module=inspect.getmodule(obj)) if t.examples
    ]
    assert tests, f"{name} has no example in its docstring"
    runner = doctest.DocTestRunner()
    report: list[str] = []
    for test in tests:
        runner.run(test, out=report.append)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, "".join(report)
    assert result.attempted >= 5
