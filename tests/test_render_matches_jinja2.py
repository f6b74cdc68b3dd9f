"""The render shortcuts give jinja2's and Decimal's own answers: the dict-first attribute lookup and
the one-call printing of a value (`escaped`) render the same bytes as jinja2's Environment, and the
integer digits are those of the Decimal."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jinja2 import Environment, StrictUndefined, UndefinedError
from markupsafe import Markup, escape

import renderutil
import transforms.documents.render as render
from transforms.documents.render import (
    DictFirstEnvironment,
    compiled_template,
    escaped,
    invoice_html,
    money_digits,
    visible_bidi,
)
from transforms.money import from_minor, minor_exponent


@given(st.integers(min_value=-10**22, max_value=10**22), st.sampled_from(["USD", "JPY", "KWD", "EUR", "CLF"]))
def test_integer_digits_are_the_decimal_digits(amount_minor, currency):
    expected = format(from_minor(abs(amount_minor), currency), f",.{minor_exponent(currency)}f")
    assert money_digits(amount_minor, currency) == expected


# Text drawn mostly from the characters escaping and the bidi rule change, around plain ones.
TEXTS = st.text(alphabet=st.sampled_from("ab 1.,&<>\"'\u202a\u202e\u2066\u2069\u00e9\u00b7") | st.characters())


@given(st.one_of(TEXTS, TEXTS.map(Markup), st.integers(), st.booleans(), st.none(),
                 st.decimals(allow_nan=False, allow_infinity=False)))
def test_a_printed_value_is_what_jinja2_prints(value):
    assert str(escaped(value)) == str(escape(visible_bidi(value)))


def test_an_undefined_value_is_still_an_error():
    with pytest.raises(UndefinedError):
        escaped(StrictUndefined(name="amount"))


@pytest.mark.parametrize("obj, name", [({"kind": "usage"}, "kind"), ({"items": "x"}, "items"), ({}, "keys"),
                                       (Decimal(1), "real"), ("text", "upper")])
def test_dict_first_lookup_gives_what_jinja2_gives(obj, name):
    ours, theirs = DictFirstEnvironment(undefined=StrictUndefined), Environment(undefined=StrictUndefined)
    assert ours.getattr(obj, name) == theirs.getattr(obj, name)


def test_a_missing_key_is_still_an_error():
    with pytest.raises(UndefinedError):
        str(DictFirstEnvironment(undefined=StrictUndefined).getattr({"kind": "usage"}, "amount"))


# A customer whose fields need escaping and bidi marking: the slow path of `escaped`.
HOSTILE = {**renderutil.CUSTOMER, "name": "Tom & \"Jerry's\" <b>Shop</b>", "address": "1 \u202eMain\u202c St",
           "email": "a&b@example.test"}


@pytest.mark.parametrize("customer", [renderutil.CUSTOMER, HOSTILE], ids=["plain", "hostile"])
@pytest.mark.parametrize("document", ["invoice", "credit_note"])
def test_documents_are_the_bytes_of_jinja2s_own_environment(monkeypatch, document, customer):
    if document == "invoice":
        args = (renderutil.sample_invoice(), customer, renderutil.SELLER, "half_up", renderutil.RUN_ID)
        kwargs = {"credits": renderutil.sample_credits()}
    else:
        args = (renderutil.sample_credit_note(), customer, renderutil.SELLER, "half_up", renderutil.RUN_ID)
        kwargs = {}
    fast = invoice_html(*args, **kwargs)
    compiled_template.cache_clear()
    monkeypatch.setattr(render, "DictFirstEnvironment", Environment)
    try:
        plain = invoice_html(*args, **kwargs)
    finally:
        compiled_template.cache_clear()
    assert fast == plain
