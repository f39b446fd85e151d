"""``KEY=VALUE`` command-line options: one parser for every command."""

from __future__ import annotations

import pytest

from repsim.errors import RecipeError
from repsim.options import parse_key_values


def test_scalars() -> None:
    assert parse_key_values(["n=2", "lr=0.5", "small=1e-3", "on=true", "off=false"]) == {
        "n": 2, "lr": 0.5, "small": 1e-3, "on": True, "off": False}


def test_strings() -> None:
    assert parse_key_values(["branch=student", "arch='vit_small_patch16_224'", 'q="a b"',
                             "path=ckpt/x.pth", "empty="]) == {
        "branch": "student", "arch": "vit_small_patch16_224", "q": "a b",
        "path": "ckpt/x.pth", "empty": ""}


def test_lists_and_tables_in_toml_or_json() -> None:
    assert parse_key_values(["layers=[1, 1, 1, 1]", "names=['a', \"b\"]",
                             "toml={depth = 2}", 'json={"depth": 2, "img_size": 32}',
                             "none=null"]) == {
        "layers": [1, 1, 1, 1], "names": ["a", "b"], "toml": {"depth": 2},
        "json": {"depth": 2, "img_size": 32}, "none": None}


def test_key_is_stripped_and_value_may_hold_equals() -> None:
    assert parse_key_values([" key =a=b"]) == {"key": "a=b"}


@pytest.mark.parametrize("item", ["branch", "=student"])
def test_malformed_item_names_it_and_the_form(item: str) -> None:
    with pytest.raises(RecipeError, match=f"-p '{item}' must look like KEY=VALUE"):
        parse_key_values(["n=1", item], option="-p")
