"""bench.options: values checked against type hints, every refusal one sentence in one style."""

from dataclasses import dataclass
from typing import Annotated, Literal

import pytest
from omegaconf import OmegaConf

from bench.errors import UserError
from bench.options import Positive, PositiveInt, Probability, Range, Rule, check, hints, validate


def refused(name, value, hint) -> str:
    with pytest.raises(UserError) as e:
        check(name, value, hint)
    return str(e.value)


@pytest.mark.parametrize(
    "value,hint,allowed",
    [
        ("abc", float, "a number"),
        (True, float, "a number"),
        (float("nan"), float, "a number"),
        (float("inf"), float, "a number"),
        (True, int, "an integer"),
        (2.5, int, "an integer"),
        ("3", int, "an integer"),
        (1, bool, "true or false"),
        (1, str, "a string"),
        (1.5, Annotated[float, Range(0, 1, hi_open=True)], "a number in [0, 1)"),
        (1.0, Annotated[float, Range(0, 1, hi_open=True)], "a number in [0, 1)"),
        (float("nan"), Probability, "a number in [0, 1]"),
        (0, Positive, "a number > 0"),
        (0, PositiveInt, "an integer >= 1"),
        (-1, Annotated[float, Range(0, lo_open=False)], "a number >= 0"),
        (2, Annotated[int, Range(hi=1, hi_open=True)], "an integer < 1"),
        ("beta", Literal["uniform", "grid128"], "one of uniform, grid128"),
        (True, Literal[1, 2, 4], "one of 1, 2, 4"),  # True == 1, but it is not a step count
        (1.0, Literal[1, 2, 4], "one of 1, 2, 4"),
        ("abc", Positive | None, "a number > 0 or null"),
        (-1.0, Positive | None, "a number > 0 or null"),
        ([0.5], tuple[float, float], "a list of 2 items, each a number"),
        ("ab", tuple[str, str], "a list of 2 items, each a string"),
        ([1, "x"], tuple[int, ...], "a list whose items are each an integer"),
        (
            [0.9, 0.1],
            Annotated[tuple[Probability, Probability], Rule(lambda v: v[0] <= v[1], "lo <= hi")],
            "a list of 2 items, each a number in [0, 1] lo <= hi",
        ),
    ],
)
def test_a_refusal_is_one_sentence_naming_the_option_the_value_and_what_is_allowed(
    value, hint, allowed
):
    assert refused("method.x", value, hint) == f"method.x={value!r} is not allowed: {allowed}"


def test_accepted_values_are_normalised():
    assert check("x", 1, float) == 1.0 and type(check("x", 1, float)) is float
    assert check("x", 0, Annotated[float, Range(0, 1, hi_open=True)]) == 0.0
    assert check("x", None, Positive | None) is None
    assert check("x", 8, Literal[1, 2, 4, 8]) == 8
    assert check("x", [0, 1], tuple[Probability, Probability]) == (0.0, 1.0)
    assert check("x", OmegaConf.create([0.2, 0.3]), tuple[float, ...]) == (0.2, 0.3)  # Hydra lists
    assert check("x", False, bool) is False
    assert check("x", 7, PositiveInt) == 7


def test_validate_checks_a_plain_dict_against_a_dataclass_or_a_signature():
    @dataclass
    class Train:
        lr: Positive = 1e-3
        steps: PositiveInt = 1000
        precision: Literal["auto", "bf16", "fp32"] = "auto"

    assert validate(Train, {"lr": 1, "precision": "bf16"}, "train") == {
        "lr": 1.0,
        "precision": "bf16",
    }
    with pytest.raises(UserError, match=r"^train.steps=0 is not allowed: an integer >= 1$"):
        validate(Train, {"steps": 0}, "train")
    with pytest.raises(
        UserError,
        match=r"^train.lrr=0.1 is not allowed: not an option; the options are lr, steps, precision$",
    ):
        validate(Train, {"lrr": 0.1}, "train")

    def build(k_ratio: Annotated[float, Range(0, 1, hi_open=True)] = 0.25, label: str = ""):
        pass

    assert validate(build, {"k_ratio": 0}, "method") == {"k_ratio": 0.0}
    with pytest.raises(UserError, match=r"^method.k_ratio=1 is not allowed: a number in \[0, 1\)$"):
        validate(build, {"k_ratio": 1}, "method")


def test_an_option_without_a_hint_is_a_programming_error():
    def build(a: int, b=2):
        pass

    with pytest.raises(TypeError, match=r"no type hint for \['b'\]"):
        hints(build)
