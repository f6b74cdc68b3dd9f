"""The render shortcuts give jinja2's and Decimal's own answers: the dict-first attribute lookup
renders the same bytes as jinja2's Environment, and the integer digits are those of the Decimal."""
from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from jinja2 import Environment, StrictUndefined, UndefinedError

import renderutil
import transforms.documents.render as render
from transforms.documents.render import DictFirstEnvironment, compiled_template, invoice_html, money_digits
from transforms.money import from_minor, minor_exponent


@given(st.integers(min_value=-10**22, max_value=10**22), st.sampled_from(["USD", "JPY", "KWD", "EUR", "CLF"]))
def test_integer_digits_are_the_decimal_digits(amount_minor, currency):
    expected = format(from_minor(abs(amount_minor), currency), f",.{minor_exponent(currency)}f")
    assert money_digits(amount_minor, currency) == expected


@pytest.mark.parametrize("obj, name", [({"kind": "usage"}, "kind"), ({"items": "x"}, "items"), ({}, "keys"),
                                       (Decimal(1), "real"), ("text", "upper")])
def test_dict_first_lookup_gives_what_jinja2_gives(obj, name):
    ours, theirs = DictFirstEnvironment(undefined=StrictUndefined), Environment(undefined=StrictUndefined)
    assert ours.getattr(obj, name) == theirs.getattr(obj, name)


def test_a_missing_key_is_still_an_error():
    with pytest.raises(UndefinedError):
        str(DictFirstEnvironment(undefined=StrictUndefined).getattr({"kind": "usage"}, "amount"))


@pytest.mark.parametrize("document", ["invoice", "credit_note"])
def test_documents_are_the_bytes_of_jinja2s_own_environment(monkeypatch, document):
    if document == "invoice":
        args = (renderutil.sample_invoice(), renderutil.CUSTOMER, renderutil.SELLER, "half_up", renderutil.RUN_ID)
        kwargs = {"credits": renderutil.sample_credits()}
    else:
        args = (renderutil.sample_credit_note(), renderutil.CUSTOMER, renderutil.SELLER, "half_up", renderutil.RUN_ID)
        kwargs = {}
    fast = invoice_html(*args, **kwargs)
    compiled_template.cache_clear()
    monkeypatch.setattr(render, "DictFirstEnvironment", Environment)
    try:
        plain = invoice_html(*args, **kwargs)
    finally:
        compiled_template.cache_clear()
    assert fast == plain
