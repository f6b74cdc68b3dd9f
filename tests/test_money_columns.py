"""The one rounding rule over columns (`to_minor_column`) is `to_minor`, value for value (up to
10^25 counts: past 28 digits Python's decimal context, not the rule, would decide)."""
from __future__ import annotations

from decimal import Decimal

import polars as pl
from hypothesis import given
from hypothesis import strategies as st

from transforms.money import minor_exponent, to_minor, to_minor_column


@given(st.lists(st.integers(0, 10**25), min_size=1, max_size=50), st.integers(0, 9),
       st.sampled_from(["USD", "JPY", "KWD"]), st.sampled_from(["half_up", "half_even"]))
def test_the_column_rounding_is_to_minor(counts, scale, currency, rounding):
    minor = minor_exponent(currency)
    scale = max(scale, minor)  # the column path counts at a scale at least the currency's
    frame = pl.DataFrame({"amount": counts}, schema={"amount": pl.Int128}).with_columns(
        div=pl.lit(10 ** (scale - minor), dtype=pl.Int128), half_even=pl.lit(rounding == "half_even"))
    got = frame.select(to_minor_column(pl.col("amount"), pl.col("div"), pl.col("half_even")))["amount"].to_list()
    assert got == [to_minor(Decimal(n).scaleb(-scale), currency, rounding) for n in counts]


def test_halves_round_by_the_rule():
    frame = pl.DataFrame({"amount": [5, 15, 25, 4, 6]}, schema={"amount": pl.Int128})
    for half_even, expected in ((False, [1, 2, 3, 0, 1]), (True, [0, 2, 2, 0, 1])):
        got = frame.select(to_minor_column(pl.col("amount"), pl.lit(10, dtype=pl.Int128), pl.lit(half_even)))
        assert got["amount"].to_list() == expected
