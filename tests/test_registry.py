"""steerlib.registry: the decorator enters a class under its name and names it; a name taken or unknown raises."""

from __future__ import annotations

from typing import Any

import pytest

from steerlib.registry import class_register, lookup


def test_class_register_enters_and_names_the_class() -> None:
    table: dict[str, Any] = {}

    @class_register(table, "widget", "kind", "round")
    class Round:
        kind = ""

    assert table == {"round": Round}
    assert Round.kind == "round"


def test_a_name_taken_raises_and_leaves_the_table_as_it_was() -> None:
    table: dict[str, Any] = {}
    first = class_register(table, "widget", "kind", "round")(type("First", (), {}))
    second = type("Second", (), {})
    with pytest.raises(ValueError, match=r"^widget 'round' is already registered by First$"):
        class_register(table, "widget", "kind", "round")(second)
    assert table == {"round": first}
    assert not hasattr(second, "kind")


def test_lookup_names_the_unknown_key_and_lists_the_valid_ones_sorted() -> None:
    table = {"b": 2, "a": 1}
    assert lookup(table, "widget", "b") == 2
    with pytest.raises(ValueError, match=r"^unknown widget 'c'; valid: a, b$"):
        lookup(table, "widget", "c")
