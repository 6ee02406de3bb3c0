"""The declarative checks every command's options go through (havir.validation)."""

import math

import numpy as np
import pytest

from havir.errors import InvalidInputError
from havir.validation import Interval, ListOf, OneOf, check_options, check_values


@pytest.mark.parametrize(
    "rule, allowed, refused",
    [
        (Interval(int, 1), [1, 2, 10**9, np.int64(3)], [0, -2, 1.0, True, None, "1", math.nan]),
        (Interval(float, 0, 1), [0, 0.0, 0.5, 1, 1.0], [-1e-9, 1.0000001, math.nan, math.inf, -math.inf, False]),
        (Interval(float, 0, closed="right"), [1e-12, 3.0], [0.0, math.nan, math.inf]),
        (Interval(float, 0, 1, closed="neither"), [0.5], [0.0, 1.0]),
        (Interval(int, 1, optional=True), [None, 1], [0, -1]),
        (OneOf("ddim", "pndm"), ["ddim"], ["DDIM", "", None]),
        (OneOf(True, False), [True, False], [1, 0, "yes"]),
        (ListOf(Interval(float, 0, closed="right")), [[1.0], (1, 10.0)], [[], [1.0, -1.0], [math.nan], 1.0]),
    ],
)
def test_rules_allow_exactly_their_values(rule, allowed, refused):
    assert all(rule.allows(value) for value in allowed)
    assert not any(rule.allows(value) for value in refused)


def test_messages_name_the_option_the_range_the_value_and_the_fix():
    with pytest.raises(InvalidInputError, match=r"^--text-share must be a finite number in \[0, 1\], got nan$"):
        check_options({"text_share": Interval(float, 0, 1)}, text_share=math.nan)
    with pytest.raises(InvalidInputError, match=r"^batch_size must be a whole number >= 1, got 0: fix it in c.toml$"):
        check_values({"batch_size": 0, "other": -1}, {"batch_size": Interval(int, 1)}, fix="fix it in c.toml")
    with pytest.raises(InvalidInputError, match=r"^--mode must be one of fused, semantic, got 'both'$"):
        check_options({"mode": OneOf("fused", "semantic")}, mode="both")
    check_options({"limit": Interval(int, 1, optional=True)}, limit=None)  # unset is fine
