"""Plan files: mistakes a pricing team makes are refused on load with one line naming the file and
the field; the repo's own catalog loads; YAML is read with the safe loader."""
from __future__ import annotations

from datetime import date
from decimal import Decimal as D
from pathlib import Path

import pytest

from transforms.inputs.plans import Catalog, PlanError, load_catalog, parse_plan

REPO_PLANS = Path(__file__).resolve().parent.parent / "plans"
PATH = "plans/api-v1.yaml"
HEAD = "plan: api\nversion: 1\neffective_from: 2026-09-01\ncurrency: USD\n"
OK_CHARGE = '  - {meter: calls, price: {model: standard, unit_price: "0.10"}}\n'


def charges(*blocks: str) -> str:
    return HEAD + "charges:\n" + "".join(f"  - {b}\n" for b in blocks)


def refused(text: str, path: str = PATH) -> str:
    with pytest.raises(PlanError) as exc:
        parse_plan(text, path)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


MISTAKES = [
    pytest.param(charges("{meter: calls, price: {model: standard, unit_price: 0.10}}"),
                 'charges[0].price.unit_price: quote money as a string, e.g. "0.1" (got float 0.1)',
                 id="float price"),
    pytest.param(HEAD + "fixed_fees:\n  - {name: Seat, amount: 20.00}\n",
                 'fixed_fees[0].amount: quote money as a string', id="float fixed fee"),
    pytest.param(HEAD + "commitment: {minimum: 1000}\n", 'commitment.minimum: quote money as a string',
                 id="unquoted integer money"),
    pytest.param(charges('{meter: calls, price: {model: tiered, unit_price: "0.10"}}'),
                 "charges[0].price: unknown price model 'tiered'; use one of ['graduated', 'graduated_percentage', "
                 "'package', 'percentage', 'standard', 'volume']", id="unknown model"),
    pytest.param(HEAD + "notice_day: 30\n", "notice_day: unknown field (check its spelling", id="typo at top level"),
    pytest.param(charges('{meter: calls, filtr: {model: a}, price: {model: standard, unit_price: "1"}}'),
                 "charges[0].filtr: unknown field", id="typo in a charge"),
    pytest.param(charges('{meter: calls, price: {model: standard, unit_price: "1", per_unit: 10}}'),
                 "charges[0].price.per_unit: unknown field", id="typo in a price block"),
    pytest.param(charges('{meter: calls, price: {model: standard, unit_prise: "1"}}'),
                 "charges[0].price.unit_prise: unknown field",
                 id="typo of a required field names the typo, not the missing field"),
    pytest.param("plan: api\nversion: 1\neffective_from: 2026-09-01\n", "currency: required field is missing",
                 id="missing currency"),
    pytest.param(HEAD.replace("USD", "USX"), "currency: 'USX' is not an ISO 4217 currency code", id="currency USX"),
    pytest.param(HEAD.replace("USD", "usd"), "currency: 'usd' is not an ISO 4217 currency code", id="currency usd"),
    pytest.param(charges('{meter: calls, price: {model: graduated, tiers: [{up_to: 100, unit_price: "1"}, '
                         '{up_to: 50, unit_price: "0.5"}, {up_to: null, unit_price: "0.1"}]}}'),
                 "charges[0].price.tiers[1].up_to: 50 is not above the previous tier's 100; tiers must be contiguous",
                 id="non-contiguous tiers: 100 then 50"),
    pytest.param(charges('{meter: calls, price: {model: volume, tiers: [{up_to: null, unit_price: "1"}, '
                         '{up_to: 100, unit_price: "0.5"}]}}'),
                 "charges[0].price.tiers[0].up_to: only the last tier may be open (up_to: null)",
                 id="open tier not last"),
    pytest.param(HEAD + "migrate_existing_on: 2026-08-31\n",
                 "migrate_existing_on is before effective_from", id="migrate_existing_on before effective_from"),
    pytest.param(charges('{meter: tokens, filter: {model: a}, price: {model: standard, unit_price: "1"}}',
                         '{meter: tokens, filter: {region: eu}, price: {model: standard, unit_price: "1"}}'),
                 "charges[1] and charges[0] could both bill one tokens event", id="overlapping filters, other dims"),
    pytest.param(charges('{meter: tokens, price: {model: standard, unit_price: "1"}}',
                         '{meter: tokens, filter: {model: a}, price: {model: standard, unit_price: "2"}}'),
                 "charges[1] and charges[0] could both bill one tokens event", id="overlapping: no filter vs filter"),
    pytest.param(charges('{meter: calls, included: 100, group_by: [region], '
                         'price: {model: standard, unit_price: "1"}}'),
                 "charges[0]: included with group_by is ambiguous", id="included with group_by"),
    pytest.param(charges('{meter: api calls, price: {model: standard, unit_price: "1"}}'),
                 "charges[0].meter: 'api calls' is not a plain name", id="meter name with a space"),
    pytest.param(charges('{meter: "api\'calls", price: {model: standard, unit_price: "1"}}'),
                 "charges[0].meter: \"api'calls\" is not a plain name", id="meter name with a quote"),
    pytest.param(charges('{meter: calls, group_by: ["re gion"], price: {model: standard, unit_price: "1"}}'),
                 "charges[0].group_by[0]: 're gion' is not a plain name", id="dimension name with a space"),
    pytest.param(HEAD + "charges: [\n  - meter\n", "line 6 is not valid YAML", id="invalid YAML"),
    pytest.param(HEAD + "fixed_fees:\n  - name: Seat\n   amount: \"1\"\n", "line 7 is not valid YAML",
                 id="invalid YAML: bad indentation"),
    pytest.param("- plan: api\n- version: 1\n", "a plan file must be a mapping", id="YAML list"),
    pytest.param("", "a plan file must be a mapping", id="empty file"),
    pytest.param(HEAD + "rounding: bankers\n", "rounding: Input should be 'half_up' or 'half_even'",
                 id="unknown rounding"),
    pytest.param(HEAD.replace("version: 1", "version: 0"), "version: Input should be greater than or equal to 1",
                 id="version 0"),
]


@pytest.mark.parametrize("text, message", MISTAKES)
def test_a_plan_mistake_is_refused_naming_file_and_field(text, message):
    assert message in refused(text)


def write_plans(folder: Path, **files: str) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in files.items():
        (folder / f"{name}.yaml").write_text(text, encoding="utf-8")
    return folder


def test_two_files_with_the_same_version_are_refused(tmp_path):
    folder = write_plans(tmp_path / "plans", **{"api-a": HEAD, "api-b": HEAD.replace("2026-09-01", "2026-10-01")})
    with pytest.raises(PlanError) as exc:
        load_catalog(folder)
    assert str(exc.value) == (f"{folder / 'api-b.yaml'}: version: plan 'api' version 1 is also defined in "
                              f"{folder / 'api-a.yaml'}; give each version its own number")


def test_two_versions_with_the_same_effective_from_are_refused(tmp_path):
    folder = write_plans(tmp_path / "plans", **{"api-v1": HEAD, "api-v2": HEAD.replace("version: 1", "version: 2")})
    with pytest.raises(PlanError) as exc:
        load_catalog(folder)
    assert str(exc.value).startswith(f"{folder / 'api-v2.yaml'}: effective_from: 2026-09-01 is also the start of "
                                     f"{folder / 'api-v1.yaml'}")


def test_a_later_version_starting_earlier_is_refused():
    v1 = parse_plan(HEAD, "plans/api-v1.yaml")
    v2 = parse_plan(HEAD.replace("version: 1", "version: 2").replace("2026-09-01", "2026-08-01"), "plans/api-v2.yaml")
    with pytest.raises(PlanError, match=r"^plans/api-v2.yaml: effective_from: version 2 starts before version 1"):
        Catalog.from_files([v1, v2])


def test_load_catalog_names_the_file_at_fault(tmp_path):
    folder = write_plans(tmp_path / "plans", **{"api-v1": HEAD, "bad": HEAD.replace("USD", "USX")})
    with pytest.raises(PlanError, match=rf"^{str(folder / 'bad.yaml')}: currency: 'USX'"):
        load_catalog(folder)


def test_load_catalog_needs_a_folder_with_plans(tmp_path):
    with pytest.raises(PlanError, match="plans folder not found"):
        load_catalog(tmp_path / "nowhere")
    with pytest.raises(PlanError, match=r"no plan files \(\*\.yaml\) found"):
        load_catalog(write_plans(tmp_path / "empty"))


def test_the_repo_plans_load():
    catalog = load_catalog(REPO_PLANS)
    assert sorted(catalog.files) == [("api", 1), ("api", 2), ("enterprise", 1), ("images", 1), ("payments", 1),
                                     ("pro", 1)]
    v2 = catalog.get("api", 2).plan
    assert (v2.effective_from, v2.migrate_existing_on, v2.notice_days) == (date(2026, 10, 15), date(2026, 12, 1), 30)
    payments = catalog.get("payments", 1).plan
    assert (payments.currency, payments.rounding, payments.charges[0].price.rate) == ("EUR", "half_even", D("1.4"))
    assert catalog.get("pro", 1).plan.spend_controls.hard_cap == D("400.00")
    assert catalog.get("enterprise", 1).plan.commitment.minimum == D("2000.00")
    assert catalog.in_force_on("api", date(2026, 10, 14)).plan.version == 1
    assert catalog.in_force_on("api", date(2026, 10, 15)).plan.version == 2
    assert all(len(f.sha256) == 64 for f in catalog.files.values())


def test_prices_are_exact_decimals():
    plan = parse_plan(charges('{meter: tokens, price: {model: standard, unit_price: "0.0000025", per: 1000000}}'),
                      PATH).plan
    assert (plan.charges[0].price.unit_price, plan.charges[0].price.per) == (D("0.0000025"), D("1000000"))


# The safe loader ------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["top", "field"])
def test_python_object_tags_are_refused_not_executed(tmp_path, where):
    marker = tmp_path / "executed"
    tag = f"!!python/object/apply:os.mkdir ['{marker}']"
    text = f"{tag}\n" if where == "top" else HEAD + f"description: {tag}\n"
    message = refused(text)
    assert "is not valid YAML (could not determine a constructor for the tag" in message
    assert not marker.exists()


def test_the_loader_is_yaml_safe_loader(monkeypatch):
    import yaml

    loaders = []
    real = yaml.load
    monkeypatch.setattr(yaml, "load", lambda stream, Loader: loaders.append(Loader) or real(stream, Loader))
    parse_plan(HEAD, PATH)
    assert len(loaders) == 1 and issubclass(loaders[0], yaml.SafeLoader)


# Found while testing --------------------------------------------------------------------------

@pytest.mark.parametrize("day", ["2026-09-31", "2026-02-30"])
def test_an_impossible_date_is_refused_naming_the_file(day):
    message = refused(HEAD.replace("2026-09-01", day))  # one line starting with the file
    assert "effective_from" in message or "line 3" in message


@pytest.mark.parametrize("text", [
    pytest.param(charges('{meter: calls, price: {model: standard, unit_price: "1.00", unit_price: "0.01"}}'),
                 id="unit_price twice"),
    pytest.param(HEAD + "currency: EUR\n", id="currency twice"),
])
def test_a_key_written_twice_is_refused(text):
    refused(text)


@pytest.mark.parametrize("field", ["hard_cap", "budget"])
def test_a_negative_spend_control_is_refused(field):
    assert f"spend_controls.{field}" in refused(HEAD + f'spend_controls: {{{field}: "-5.00"}}\n')
