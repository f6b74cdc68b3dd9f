"""The credit wallet, its ledger, and the revenue it books, in three layers.

A. Worked examples of the replay (`transforms.credits`) on hand-made subscriptions, plans,
   purchases and events, with the arithmetic in the case ids: OpenMeter's two-grant expiry, the
   draw order, the [granted_at, expires_at) window, rollover with a cap, per-dimension rates, a
   money wallet, auto top-ups, prorated allocation.
B. Hypothesis properties on random wallets: credits are conserved, the balance never goes
   negative and every ledger row carries the running balance; revenue rows roll forward over
   consecutive periods, deferred revenue never goes negative and the journal balances.
C. Two real closes (2026-10, then 2026-11) of one store: invoice lines, credit_ledger, revenue,
   journal and alerts of a Midjourney-like plan with auto top-up, a credit pack that expires
   mid-November, a money-denominated prepaid balance and a blocking plan with grace.

Tests marked xfail(strict=True) state what the contract asks for and the implementation does not
do yet; each reason starts with BUG and names the place.
"""
from __future__ import annotations

import textwrap
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal as D

import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from closeutil import close, table
from creditutil import at, catalog, drawn_by_event, event, iso, moves, plan, purchase, subscription, write_store
from transforms.credits.grants import history_grants, plan_grants, purchase_grants
from transforms.credits.ledger import in_period, ledger_table
from transforms.credits.lines import credit_lines
from transforms.credits.model import Entry, WalletReplay
from transforms.credits.replay import replayed_wallets
from transforms.credits.wallet import Wallet
from transforms.engine.invoices import period_invoices
from transforms.finance.revenue import journal, proportional_rates, revenue_rows
from transforms.inputs.reference import segments_in
from transforms.money import to_minor
from transforms.periods import Period

OCT, NOV, DEC = Period(2026, 10), Period(2026, 11), Period(2026, 12)

# ---------------------------------------------------------------------------------------------
# Plans used by the unit tests
# ---------------------------------------------------------------------------------------------

WALLET = plan("""
    plan: wallet
    version: 1
    effective_from: 2026-01-01
    currency: USD
    charges:
      - {meter: images, price: {model: standard, unit_price: "0.05"}}
    credits:
      consume: {images: 1}
    """, "wallet.yaml")

# Midjourney-like: $10 a month is 200 credits (cost basis 0.05), a 100-credit pack for $4.00
# (0.04) is bought below 10, at most twice a month; past that, images bill at 0.05.
MJ_TEXT = """
    plan: mj
    version: 1
    effective_from: 2026-01-01
    currency: USD
    fixed_fees:
      - {name: Basic plan, amount: "10.00"}
    charges:
      - {name: Images beyond credits, meter: images, price: {model: standard, unit_price: "0.05"}}
    credits:
      grants:
        - {credits: 200, every: period, expires: period_end, allocated: "10.00"}
      consume: {images: 1}
      top_up: {credits: 100, price: "4.00", auto: true, below: 10, max_per_period: 2}
      when_exhausted: overage
    """
MJ = plan(MJ_TEXT, "mj.yaml")

ROLL = plan("""
    plan: roll
    version: 1
    effective_from: 2026-01-01
    currency: USD
    fixed_fees:
      - {name: Seat, amount: "10.00"}
    charges:
      - {meter: images, price: {model: standard, unit_price: "0.05"}}
    credits:
      grants:
        - {credits: 100, every: period, expires: period_end, allocated: "10.00", rollover_max: 30}
      consume: {images: 1}
    """, "roll.yaml")

BY_MODEL = plan("""
    plan: by-model
    version: 1
    effective_from: 2026-01-01
    currency: USD
    charges:
      - {meter: tokens, price: {model: standard, unit_price: "0.01"}}
    credits:
      grants:
        - {credits: 100, every: once, expires: never}
      consume:
        tokens: {by: model, rates: {gpt-4o: 3}, default: 1}
    """, "by-model.yaml")

MONEY = plan("""
    plan: money
    version: 1
    effective_from: 2026-01-01
    currency: USD
    fixed_fees:
      - {name: Platform fee, amount: "60.00"}
    charges:
      - {name: Input tokens, meter: input_tokens, price: {model: standard, unit_price: "2.50", per: 1000000}}
      - {name: Images, meter: images, price: {model: standard, unit_price: "0.04"}}
    credits:
      unit: money
      grants:
        - {credits: 50, every: once, expires: never, allocated: "50.00"}
    """, "money.yaml")

PROPORTIONAL = plan("""
    plan: prop
    version: 1
    effective_from: 2026-01-01
    currency: USD
    fixed_fees:
      - {name: Credits bundle, amount: "10.00"}
    charges:
      - {meter: images, price: {model: standard, unit_price: "0.05"}}
    credits:
      grants:
        - {credits: 100, every: once, expires: P60D, allocated: "10.00"}
      consume: {images: 1}
      breakage: proportional
      expected_breakage: "0.1"
    """, "prop.yaml")

UNIT_CATALOG = catalog(WALLET, MJ, ROLL, BY_MODEL, MONEY, PROPORTIONAL)


def replay_wallet(grants, events, until: datetime, plan_file=WALLET) -> WalletReplay:
    """One customer's wallet (customer `c`) over hand-made grants and events."""
    replay = WalletReplay()
    wallet = Wallet("c", grants, replay)
    wallet.consume_in_order(events, {e.event_id: plan_file for e in events})
    wallet.advance(until)
    return replay


def history(subs, events, period: Period) -> WalletReplay:
    """What the close of `period` replays: every grant through it, every event before its end."""
    return replayed_wallets(history_grants(subs, UNIT_CATALOG, [], period), subs, UNIT_CATALOG,
                            [e for e in events if e.event_at < period.end_at], period)


def expiries(replay: WalletReplay) -> list[tuple[str, str, datetime]]:
    return [(e.grant_id, str(-e.credits), e.occurred_at) for e in replay.entries if e.kind == "expire"]


# ---------------------------------------------------------------------------------------------
# A. Worked examples of the replay
# ---------------------------------------------------------------------------------------------

# OpenMeter, "Grant" (openmeter.io/docs, entitlements; as migrated to Kong's docs,
# Kong/developer.konghq.com app/metering-and-billing/plans.md, "Effective date and expiration"):
# Grant1 balance 100; "Use 70 ... Burn 70 ... Balance 30"; Grant2 "Takes Effect ... Balance 50",
# entitlement "Balance 80"; Grant1 "Expires", "Balance 50". So 30 credits of Grant1 expire.
# Both grants cost 0.10 a credit here (10.00 for 100, 5.00 for 50) so breakage has a price.
OM_G1 = purchase("om-g1", "c", 100, "10.00", at(10, 1, 0), at(10, 20, 0))
OM_G2 = purchase("om-g2", "c", 50, "5.00", at(10, 10, 0), at(11, 10, 0))


def test_openmeter_grant_expiry_published_70_of_100_used_then_50_granted_30_expire_balance_50():
    used = [event("c", "s", "use-70", at(10, 5), 70)]
    replay = replay_wallet(purchase_grants([OM_G1, OM_G2]), used, until=OCT.end_at)
    assert moves(replay.entries) == [
        ("purchase/om-g1", "purchase", "100", "100"),   # Grant1: balance 100
        ("purchase/om-g1", "consume", "-70", "30"),     # use 70: balance 30
        ("purchase/om-g2", "purchase", "50", "80"),     # Grant2 takes effect: balance 80
        ("purchase/om-g1", "expire", "-30", "50"),      # Grant1 expires: balance 50
    ]
    assert expiries(replay) == [("purchase/om-g1", "30", at(10, 20, 0))]


def test_openmeter_grant_expiry_extended_70_more_after_grant2_draws_30_from_g1_first_breakage_0_then_10():
    # Worked here from OpenMeter's grants: a second use of 70 after Grant2 takes effect draws
    # Grant1's 30 first (it expires first) and 40 of Grant2. Grant1 expires empty (breakage 0);
    # Grant2 expires on Nov 10 with 10 left: 10 x 0.10 = 1.00 of breakage, in November.
    used = [event("c", "s", "use-70", at(10, 5), 70), event("c", "s", "use-70-more", at(10, 15), 70)]
    october = replay_wallet(purchase_grants([OM_G1, OM_G2]), used, until=OCT.end_at)
    november = replay_wallet(purchase_grants([OM_G1, OM_G2]), used, until=NOV.end_at)
    assert moves(november.entries) == [
        ("purchase/om-g1", "purchase", "100", "100"),
        ("purchase/om-g1", "consume", "-70", "30"),
        ("purchase/om-g2", "purchase", "50", "80"),
        ("purchase/om-g1", "consume", "-30", "50"),
        ("purchase/om-g2", "consume", "-40", "10"),
        ("purchase/om-g2", "expire", "-10", "0"),
    ]
    assert expiries(november) == [("purchase/om-g2", "10", at(11, 10, 0))]
    revenue = {p: revenue_rows(p, [], o, {}).row(0, named=True) for p, o in ((OCT, october), (NOV, november))}
    money = lambda r: (r["opening_deferred_minor"], r["billed_minor"], r["recognized_minor"],  # noqa: E731
                       r["breakage_minor"], r["closing_deferred_minor"])
    assert money(revenue[OCT]) == (0, 1500, 1400, 0, 100)    # 140 used x 0.10; Grant1 broke 0
    assert money(revenue[NOV]) == (100, 0, 0, 100, 0)        # Grant2's 10 x 0.10


# Draw order: the grant that expires first; then free before paid; then the oldest.
SOON_PAID = purchase("soon-paid", "c", 10, "1.00", at(10, 1, 0), at(10, 20, 0))
SOON_FREE = purchase("soon-free", "c", 10, "0", at(10, 2, 0), at(10, 20, 0))
LATER_FREE = purchase("later-free", "c", 10, "0", at(10, 1, 0), at(10, 25, 0))
NEVER_FREE = purchase("never-free", "c", 10, "0", at(10, 5, 0))
NEVER_PAID_OLD = purchase("never-paid-old", "c", 10, "1.00", at(10, 1, 0))
NEVER_PAID_NEW = purchase("never-paid-new", "c", 10, "1.00", at(10, 3, 0))


@pytest.mark.parametrize("grants, need, drawn", [
    pytest.param([NEVER_FREE, SOON_PAID], 15, [("soon-paid", "10"), ("never-free", "5")],
                 id="expiring first beats free: 15 = paid expiring Oct 20 10 + free never 5"),
    pytest.param([SOON_PAID, SOON_FREE], 15, [("soon-free", "10"), ("soon-paid", "5")],
                 id="same expiry, free before paid: 15 = free 10 + paid 5"),
    pytest.param([NEVER_PAID_NEW, NEVER_PAID_OLD], 15, [("never-paid-old", "10"), ("never-paid-new", "5")],
                 id="same expiry, both paid, oldest first: 15 = Oct 1 10 + Oct 3 5"),
    pytest.param([NEVER_PAID_NEW, NEVER_FREE, NEVER_PAID_OLD, LATER_FREE, SOON_FREE, SOON_PAID], 55,
                 [("soon-free", "10"), ("soon-paid", "10"), ("later-free", "10"), ("never-free", "10"),
                  ("never-paid-old", "10"), ("never-paid-new", "5")],
                 id="55 = Oct 20 free 10 + Oct 20 paid 10 + Oct 25 free 10 + never free 10 "
                    "+ never paid Oct 1 10 + never paid Oct 3 5"),
])
def test_draw_order(grants, need, drawn):
    replay = replay_wallet(purchase_grants(grants), [event("c", "s", "e", at(10, 10), need)], until=at(10, 11))
    consumed = [(e.grant_id.removeprefix("purchase/"), str(-e.credits)) for e in replay.entries
                if e.kind == "consume"]
    assert consumed == drawn


# A 10-credit pack usable on [Oct 10 00:00, Oct 20 00:00): one 1-image event at each edge.
WINDOW = purchase("window", "c", 10, "1.00", at(10, 10, 0), at(10, 20, 0))


@pytest.mark.parametrize("when, drawn", [
    pytest.param(at(10, 9, 23, 59, 59), "0", id="Oct 09 23:59:59, before granted_at: 0 drawn, 1 billed"),
    pytest.param(at(10, 10, 0), "1", id="Oct 10 00:00 = granted_at, grant before consumption: 1 drawn"),
    pytest.param(at(10, 19, 23, 59, 59), "1", id="Oct 19 23:59:59, last second: 1 drawn"),
    pytest.param(at(10, 20, 0), "0", id="Oct 20 00:00 = expires_at, expiry before consumption: 0 drawn, 1 billed"),
])
def test_grant_is_usable_on_granted_at_to_expires_at_half_open(when, drawn):
    replay = replay_wallet(purchase_grants([WINDOW]), [event("c", "s", "e", when, 1)], until=OCT.end_at)
    assert drawn_by_event(replay).get("e", D(0)) == D(drawn)
    assert replay.billable_units[("s", 1, "images", "{}")] == 1 - D(drawn)
    # the expiry takes the rest: 10 if nothing was drawn, else 9
    assert expiries(replay) == [("purchase/window", str(10 - D(drawn)), at(10, 20, 0))]
    if when == WINDOW.expires_at:  # at one instant the expiry is written before the draw attempt
        assert [e.kind for e in replay.entries] == ["purchase", "expire"]


def test_period_end_expiry_belongs_to_the_period_it_ends():
    end = OCT.end_at
    expire = Entry("c", "g", "expire", D(-5), D(0), end, end, D(0))
    consume = Entry("c", "g", "consume", D(-5), D(0), end, None, D(0))
    assert in_period(expire, OCT) and not in_period(expire, NOV)
    assert in_period(consume, NOV) and not in_period(consume, OCT)


ROLL_SUB = subscription("s-roll", "c-roll", "roll")
ROLL_EVENTS = [event("c-roll", "s-roll", "oct", at(10, 10), 40), event("c-roll", "s-roll", "nov", at(11, 10), 50)]


def test_rollover_cap_30_of_60_left_carries_at_cost_basis_the_rest_expires():
    # Oct: 100 - 40 used = 60 left at Nov 1: 30 roll over (the cap), 30 expire (30 x 0.10 = 3.00).
    # Nov: the 30 rolled (same expiry Dec 1, older) are drawn before the new grant: 50 = 30 + 20;
    # the new grant's 80 left: 30 roll, 50 expire (5.00). Rolled credits do not roll again.
    november = history([ROLL_SUB], ROLL_EVENTS, NOV)
    by_kind = defaultdict(list)
    for e in november.entries:
        by_kind[e.kind].append((e.grant_id, str(e.credits), e.occurred_at))
    assert by_kind["rollover"] == [
        ("s-roll/2026-10/g1", "-30", at(11, 1, 0)), ("s-roll/2026-10/g1/rollover", "30", at(11, 1, 0)),
        ("s-roll/2026-11/g1", "-30", at(12, 1, 0)), ("s-roll/2026-11/g1/rollover", "30", at(12, 1, 0))]
    assert by_kind["expire"] == [("s-roll/2026-10/g1", "-30", at(11, 1, 0)), ("s-roll/2026-11/g1", "-50", at(12, 1, 0))]
    assert by_kind["consume"] == [("s-roll/2026-10/g1", "-40", at(10, 10)),
                                  ("s-roll/2026-10/g1/rollover", "-30", at(11, 10)),
                                  ("s-roll/2026-11/g1", "-20", at(11, 10))]
    rolled = november.grants["s-roll/2026-10/g1/rollover"]
    assert (rolled.expires_at, rolled.cost_basis, rolled.rollover_max) == (at(12, 1, 0), D("0.1"), 0)
    # revenue: a rollover moves credits already paid for: neither billed nor recognized
    rows = {p: revenue_rows(p, [], history([ROLL_SUB], ROLL_EVENTS, p), {}).row(0, named=True) for p in (OCT, NOV)}
    assert [rows[p][k] for p in (OCT, NOV) for k in ("opening_deferred_minor", "billed_minor", "recognized_minor",
                                                    "breakage_minor", "closing_deferred_minor")] == [
        0, 1000, 400, 300, 300,      # 40 x 0.10 used, 30 x 0.10 expired, 30 x 0.10 rolled (deferred)
        300, 1000, 500, 500, 300]    # 50 x 0.10 used, 50 x 0.10 expired, 30 x 0.10 rolled again


def test_rollover_ledger_rows_chain_within_each_period():
    october = ledger_table(history([ROLL_SUB], ROLL_EVENTS, OCT), OCT)
    november = ledger_table(history([ROLL_SUB], ROLL_EVENTS, NOV), NOV)
    rows = lambda t: list(t.select("grant_id", "kind", "credits", "balance_after").iter_rows())  # noqa: E731
    assert rows(october) == [
        ("s-roll/2026-10/g1", "grant", "100", "100"),
        ("s-roll/2026-10/g1", "consume", "-40", "60"),
        ("s-roll/2026-10/g1", "rollover", "-30", "30"),
        ("s-roll/2026-10/g1", "expire", "-30", "0"),       # October closes at 0
    ]
    assert rows(november)[:2] == [
        ("s-roll/2026-10/g1/rollover", "rollover", "30", "30"),   # November opens with the 30 carried
        ("s-roll/2026-11/g1", "grant", "100", "130"),
    ]


def test_per_dimension_rates_gpt4o_10x3_plus_mini_10x1_default_is_40_of_100():
    sub = subscription("s-dim", "c-dim", "by-model")
    events = [event("c-dim", "s-dim", "4o", at(10, 2), 10, meter="tokens", dims={"model": "gpt-4o"}),
              event("c-dim", "s-dim", "mini", at(10, 3), 10, meter="tokens", dims={"model": "gpt-4o-mini"})]
    replay = history([sub], events, OCT)
    assert drawn_by_event(replay) == {"4o": D(30), "mini": D(10)}
    assert replay.entries[-1].balance_after == 60


def test_money_wallet_draws_rated_amount_1234567_tokens_is_3_0864175_25_images_1_00_then_20m_leaves_1634567_billed():
    # 50.00 of prepaid balance; 1,234,567 tokens x 2.50 / 1M = 3.0864175 drawn exactly (no
    # rounding inside the wallet); 25 images x 0.04 (per 1) = 1.00; 45.9135825 left. 20M tokens
    # = 50.00: 45.9135825 covered, 4.0864175 uncovered = 20M x 4.0864175 / 50 = 1,634,567 tokens
    # left for the charge.
    sub = subscription("s-money", "c-money", "money")
    events = [event("c-money", "s-money", "small", at(10, 2), 1234567, meter="input_tokens"),
              event("c-money", "s-money", "images", at(10, 2, 13), 25, meter="images"),
              event("c-money", "s-money", "big", at(10, 3), 20000000, meter="input_tokens")]
    replay = history([sub], events, OCT)
    assert drawn_by_event(replay) == {"small": D("3.0864175"), "images": D("1.00"), "big": D("45.9135825")}
    assert replay.billable_units[("s-money", 1, "input_tokens", "{}")] == 1634567
    assert replay.billable_units[("s-money", 1, "images", "{}")] == 0
    grant = replay.grants["s-money/once/g1"]
    assert (grant.credits, grant.price, grant.cost_basis, grant.expires_at) == (50, D("50.00"), 1, None)


def test_auto_top_up_500_images_vs_200_grant_buys_2_packs_max_per_period_100_bill_as_overage_and_resets_in_november():
    sub = subscription("s-mj", "c-mj", "mj")
    events = [event("c-mj", "s-mj", "oct", at(10, 5), 500), event("c-mj", "s-mj", "nov", at(11, 2), 250)]
    october = history([sub], events, OCT)
    assert moves(october.entries) == [
        ("s-mj/2026-10/g1", "grant", "200", "200"),
        ("s-mj/2026-10/g1", "consume", "-200", "0"),
        ("s-mj/2026-10/top_up1", "top_up", "100", "100"),
        ("s-mj/2026-10/top_up1", "consume", "-100", "0"),
        ("s-mj/2026-10/top_up2", "top_up", "100", "100"),
        ("s-mj/2026-10/top_up2", "consume", "-100", "0"),
    ]
    assert october.billable_units[("s-mj", 1, "images", "{}")] == 100
    assert [(kind, threshold, D(value)) for _, _, kind, threshold, value, _ in october.alerts] == [
        ("auto_top_up", "1", D("4.00")), ("auto_top_up", "2", D("4.00")), ("top_up_limit_reached", "2", D(0)),
        ("credits_low", "10", D(0)), ("credits_exhausted", "0", D(100))]
    # November: the new grant's 200 + the month's first pack (the count resets) cover the 250;
    # 50 of the pack are left and the spent grant has nothing to expire
    november = history([sub], events, NOV)
    assert moves(november.entries)[len(october.entries):] == [
        ("s-mj/2026-11/g1", "grant", "200", "200"),
        ("s-mj/2026-11/g1", "consume", "-200", "0"),
        ("s-mj/2026-11/top_up1", "top_up", "100", "100"),
        ("s-mj/2026-11/top_up1", "consume", "-50", "50"),
    ]
    # the units left for the charges are October's 100; November's are all covered
    assert november.billable_units[("s-mj", 1, "images", "{}")] == 100


@pytest.mark.parametrize("images, packs, balance", [
    pytest.param(190, 0, "10", id="200 - 190 = 10, not below 10: no pack"),
    pytest.param(191, 1, "109", id="200 - 191 = 9 < 10: one pack, 9 + 100 = 109"),
])
def test_auto_top_up_buys_when_the_balance_falls_below_below_after_an_event(images, packs, balance):
    sub = subscription("s-mj", "c-mj", "mj")
    replay = history([sub], [event("c-mj", "s-mj", "e", at(10, 5), images)], OCT)
    assert sum(1 for g in replay.grants.values() if g.kind == "top_up") == packs
    assert [str(e.balance_after) for e in replay.entries if e.occurred_at == at(10, 5)][-1] == balance
    assert [a[2] for a in replay.alerts] == ["auto_top_up"] * packs   # no credits_low: the pack restored it


def test_allocated_is_prorated_by_days_like_the_fee_10_00_x17_over_31_from_oct_15():
    sub = subscription("s-late", "c-late", "mj", start=date(2026, 10, 15))
    october, november = plan_grants([sub], UNIT_CATALOG, NOV)
    assert (october.granted_at, october.expires_at, october.credits) == (at(10, 15, 0), at(11, 1, 0), 200)
    # 10.00 x 17/31 = 5.4838.. is billed as 5.48 on the fee line, and that is the grant's price
    assert october.price == D("5.48") and to_minor(D("10.00") * 17 / 31, "USD") == 548
    assert october.cost_basis == october.price / 200
    assert (november.granted_at, november.price) == (at(11, 1, 0), D("10.00"))


def test_proportional_breakage_never_exceeds_what_is_deferred_95_of_100_used_recognized_9_50_breakage_0_50():
    # 10.00 for 100 credits (0.10), expected breakage 10%: each credit used brings 0.10 x 0.1/0.9
    # of breakage along. 95 used in October: recognized 9.50; breakage 95 x 0.0111 = 1.0556 would
    # exceed the 0.50 still deferred, so it stops at 0.50 and nothing is left deferred.
    sub = subscription("s-prop", "c-prop", "prop")
    replay = history([sub], [event("c-prop", "s-prop", "e", at(10, 5), 95)], OCT)
    rows = revenue_rows(OCT, [], replay, proportional_rates(replay, {"s-prop": PROPORTIONAL.plan}))
    row = rows.row(0, named=True)
    assert (row["billed_minor"], row["recognized_minor"], row["breakage_minor"],
            row["closing_deferred_minor"]) == (1000, 950, 50, 0)


def test_proportional_breakage_50_of_100_used_rides_along_at_10_over_90():
    # The case the rule is written for: 50 used = 5.00 recognized, 5.00 x 0.1/0.9 = 0.5556 -> 0.56
    # breakage, 4.44 still deferred.
    sub = subscription("s-prop", "c-prop", "prop")
    replay = history([sub], [event("c-prop", "s-prop", "e", at(10, 5), 50)], OCT)
    row = revenue_rows(OCT, [], replay, proportional_rates(replay, {"s-prop": PROPORTIONAL.plan})).row(0, named=True)
    assert (row["billed_minor"], row["recognized_minor"], row["breakage_minor"],
            row["closing_deferred_minor"]) == (1000, 500, 56, 444)


def test_revenue_billed_equals_invoiced_prorated_allocations_5_48_plus_5_33_is_10_81():
    sub = subscription("s-pro", "c-pro", "mj", start=date(2026, 10, 15), end=date(2026, 11, 17))
    invoiced = billed = 0
    for period in (OCT, NOV):
        replay = history([sub], [], period)
        lines = credit_lines(period, replay, [], [sub], {"s-pro": "USD"}, {"s-pro": "half_up"})
        invoices = period_invoices(period, segments_in(period, [sub], UNIT_CATALOG), {}, lines)
        invoiced += sum(i.total_minor for i in invoices)
        billed += revenue_rows(period, invoices, replay, {})["billed_minor"].sum()
    assert invoiced == 548 + 533
    assert billed == invoiced


# ---------------------------------------------------------------------------------------------
# B. Properties on random wallets
# ---------------------------------------------------------------------------------------------

H_PLANS = {
    # plan grants with a rollover cap, priced
    "h-roll": """
        fixed_fees: [{name: Seat, amount: "10.00"}]
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 50, every: period, expires: period_end, allocated: "5.00", rollover_max: 20}]
          consume: {images: 1}
        """,
    # plan grants and auto top-ups
    "h-topup": """
        fixed_fees: [{name: Seat, amount: "10.00"}]
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 30, every: period, expires: period_end, allocated: "3.00"}]
          consume: {images: 1}
          top_up: {credits: 25, price: "2.50", auto: true, below: 5, max_per_period: 2}
        """,
    # a free one-off grant that lapses after 20 days, 2 credits an image, blocking with grace
    "h-block": """
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 40, every: once, expires: P20D}]
          consume: {images: 2}
          when_exhausted: block
          grace: 7
        """,
    # purchases only; a pack that never expires by default
    "h-packs": """
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          consume: {images: 1}
          top_up: {credits: 10, price: "1.00", auto: true, below: 1, expires: P10D}
        """,
    # proportional breakage on grants that outlive the period, and on top-ups
    "h-prop": """
        fixed_fees: [{name: Seat, amount: "10.00"}]
        charges: [{meter: images, price: {model: standard, unit_price: "0.05"}}]
        credits:
          grants: [{credits: 100, every: period, expires: P45D, allocated: "10.00"}]
          consume: {images: 1}
          top_up: {credits: 20, price: "3.00", auto: true, below: 3}
          breakage: proportional
          expected_breakage: "0.1"
        """,
}
H_FILES = {key: plan(f"plan: {key}\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\n" + textwrap.dedent(text),
                     f"{key}.yaml") for key, text in H_PLANS.items()}
H_CATALOG = catalog(*H_FILES.values())
RATE = {"h-roll": 1, "h-topup": 1, "h-block": 2, "h-packs": 1, "h-prop": 1}
START = datetime(2026, 10, 1, tzinfo=timezone.utc)
END = datetime(2027, 1, 1, tzinfo=timezone.utc)
PERIODS = (OCT, NOV, DEC)

# One customer: (plan, start day in October, purchases, events). Purchases are (hours after Oct 1,
# credits, price in cents, lifetime in hours or None); events are (hours after the subscription
# starts, tenths of an image). Whole hours make instants collide with grants, expiries and period
# ends, which is where ordering rules matter.
purchases_st = st.lists(st.tuples(st.integers(0, 92 * 24 - 1), st.integers(1, 120), st.integers(0, 3000),
                                  st.one_of(st.none(), st.integers(1, 40 * 24))), max_size=3)
events_st = st.lists(st.tuples(st.integers(0, 92 * 24 - 1), st.integers(0, 900)), max_size=8)


def customers_st(plans: list[str]):
    return st.lists(st.tuples(st.sampled_from(plans), st.integers(1, 28), purchases_st, events_st),
                    min_size=1, max_size=3)


def world(customers):
    """Subscriptions, purchases and events of a drawn scenario."""
    subs, purchases, events = [], [], []
    for n, (plan_key, day, packs, uses) in enumerate(customers):
        customer, sub_id = f"c{n}", f"s{n}"
        start = date(2026, 10, day)
        subs.append(subscription(sub_id, customer, plan_key, start=start))
        for k, (hours, credits, cents, life) in enumerate(packs):
            bought = START + timedelta(hours=hours)
            purchases.append(purchase(f"p{n}-{k}", customer, credits, str(D(cents) / 100), bought,
                                      None if life is None else bought + timedelta(hours=life)))
        for k, (hours, tenths) in enumerate(uses):
            when = datetime.combine(start, datetime.min.time(), timezone.utc) + timedelta(hours=hours)
            if when < END:
                events.append(event(customer, sub_id, f"e{n}-{k}", when, D(tenths) / 10))
    return subs, purchases, events


def replayed(subs, purchases, events, period: Period) -> WalletReplay:
    return replayed_wallets(history_grants(subs, H_CATALOG, purchases, period), subs, H_CATALOG,
                            [e for e in events if e.event_at < period.end_at], period)


INFLOWS = ("grant", "purchase", "top_up")
H_SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@H_SETTINGS
@given(customers_st(["h-roll", "h-topup", "h-block", "h-packs"]))
# a pack of 10 bought Oct 1 00:00 for 2 days, 9.5 used at 01:00: 0.5 expires, a top-up follows
@example([("h-packs", 1, [(0, 10, 100, 48)], [(1, 95)])])
# 50 granted, 10.5 used: 20 roll over, 19.5 expire at Nov 1; the rolled 20 expire at Dec 1
@example([("h-roll", 1, [], [(24, 105)])])
def test_credits_are_conserved_and_the_balance_is_the_running_sum_never_negative(customers):
    subs, purchases, events = world(customers)
    replay = replayed(subs, purchases, events, DEC)
    plan_of = {s.customer_id: s.plan for s in subs}
    for sub in subs:
        entries = [e for e in replay.entries if e.customer_id == sub.customer_id]
        running = D(0)
        for e in entries:
            running += e.credits
            assert e.balance_after == running >= 0
        total = defaultdict(D)
        for e in entries:
            kind = e.kind if e.kind != "rollover" else ("rollover_in" if e.credits > 0 else "rollover_out")
            total[kind] += e.credits
        granted = sum((total[k] for k in INFLOWS + ("rollover_in",)), D(0))
        used, expired, rolled_out = -total["consume"], -total["expire"], -total["rollover_out"]
        final = entries[-1].balance_after if entries else D(0)
        assert granted == used + expired + rolled_out + final
        # the final balance is what the customer's grants still hold
        assert final == sum((g.remaining for g in replay.grants.values() if g.customer_id == sub.customer_id), D(0))
        # every draw is inside its grant's [granted_at, expires_at)
        for e in entries:
            if e.kind == "consume":
                g = replay.grants[e.grant_id]
                assert g.granted_at <= e.occurred_at and (g.expires_at is None or e.occurred_at < g.expires_at)
        # every unit is covered by credits, left for the charges or blocked
        quantity = sum((ev.quantity for ev in events if ev.customer_id == sub.customer_id), D(0))
        covered = used / RATE[plan_of[sub.customer_id]]
        left = sum((u for k, u in replay.billable_units.items() if k[0] == sub.subscription_id), D(0))
        blocked = sum((u for k, u in replay.blocked_units.items() if k[0] == sub.subscription_id), D(0))
        assert covered + left + blocked == quantity


def _ledger_chains(customers):
    subs, purchases, events = world(customers)
    last: dict[str, D] = defaultdict(D)
    for period in PERIODS:
        for customer, credits, balance in ledger_table(replayed(subs, purchases, events, period), period).select(
                "customer_id", "credits", "balance_after").iter_rows():
            assert last[customer] + D(credits) == D(balance), (str(period), customer)
            last[customer] = D(balance)


@H_SETTINGS
@given(customers_st(["h-topup", "h-block", "h-packs", "h-prop"]))
def test_each_periods_credit_ledger_continues_from_the_last_balance_of_the_one_before(customers):
    _ledger_chains(customers)


@H_SETTINGS
@given(customers_st(["h-roll"]))
@example([("h-roll", 1, [], [(24, 100)])])   # 10 of 50 used: 20 roll over, 20 expire at Nov 1
def test_each_periods_credit_ledger_continues_with_rollovers(customers):
    _ledger_chains(customers)


def _revenue_rolls_forward(customers):
    subs, purchases, events = world(customers)
    plan_of = {s.subscription_id: H_FILES[s.plan].plan for s in subs}
    closing: dict[tuple, int] = {}
    billed = defaultdict(int)
    recognized = defaultdict(int)
    for period in PERIODS:
        replay = replayed(subs, purchases, events, period)
        # revenue_rows raises if it does not reconcile
        rows = revenue_rows(period, [], replay, proportional_rates(replay, plan_of))
        for r in rows.iter_rows(named=True):
            key = (r["customer_id"], r["stream"], r["currency"])
            assert r["opening_deferred_minor"] == closing.get(key, 0)
            assert (r["opening_deferred_minor"] + r["billed_minor"] - r["recognized_minor"] - r["breakage_minor"]
                    == r["closing_deferred_minor"] >= 0)
            closing[key] = r["closing_deferred_minor"]
            billed[key] += r["billed_minor"]
            recognized[key] += r["recognized_minor"] + r["breakage_minor"]
        entries = journal(rows)   # raises if debits != credits
        assert entries["debit_minor"].sum() == entries["credit_minor"].sum()
    for key in billed:
        assert billed[key] == recognized[key] + closing[key]


@H_SETTINGS
@given(customers_st(["h-roll", "h-topup", "h-block", "h-packs"]))
def test_revenue_rows_roll_forward_over_three_periods_and_the_journal_balances(customers):
    _revenue_rolls_forward(customers)


@H_SETTINGS
@given(customers_st(["h-prop"]))
@example([("h-prop", 1, [], [(24, 950)])])   # 95 of 100 used in October, the grant lapses Nov 15
def test_revenue_rows_roll_forward_with_proportional_breakage(customers):
    _revenue_rolls_forward(customers)


# ---------------------------------------------------------------------------------------------
# C. Two real closes of one store: 2026-10, then 2026-11
# ---------------------------------------------------------------------------------------------

CLOSE_PLANS = {
    "mj-v1": MJ_TEXT,
    "packs-v1": """
        plan: packs
        version: 1
        effective_from: 2026-01-01
        currency: USD
        charges:
          - {name: Images, meter: images, price: {model: standard, unit_price: "0.05"}}
        credits:
          consume: {images: 1}
        """,
    "tokens-v1": """
        plan: tokens
        version: 1
        effective_from: 2026-01-01
        currency: USD
        fixed_fees:
          - {name: Platform fee, amount: "60.00"}
        charges:
          - {name: Input tokens, meter: input_tokens, price: {model: standard, unit_price: "2.50", per: 1000000}}
          - {name: Output tokens, meter: output_tokens, price: {model: standard, unit_price: "10.00", per: 1000000}}
        credits:
          unit: money
          grants:
            - {credits: 50, every: once, expires: never, allocated: "50.00"}
        """,
    "sketch-v1": """
        plan: sketch
        version: 1
        effective_from: 2026-01-01
        currency: USD
        fixed_fees:
          - {name: Sketch seat, amount: "5.00"}
        charges:
          - {name: Images past credits, meter: images, price: {model: standard, unit_price: "0.10"}}
        credits:
          grants:
            - {credits: 100, every: period, expires: period_end}
          consume: {images: 1}
          when_exhausted: block
          grace: 20
          low_balance: 10
        """,
}

# (customer, plan, start, end)
CLOSE_SUBS = [("mj-250", "mj", "2026-10-01", ""), ("mj-191", "mj", "2026-10-01", ""),
              ("pack", "packs", "2026-10-01", ""), ("tokens", "tokens", "2026-10-01", ""),
              ("sketch", "sketch", "2026-10-01", ""), ("prorated", "mj", "2026-10-15", "2026-11-17")]

# (event_id, customer, meter, quantity, instant)
CLOSE_USAGE = {
    "2026-10/events": [
        ("mj-250-1", "mj-250", "images", "150", at(10, 5)),
        ("mj-250-2", "mj-250", "images", "45", at(10, 10)),
        ("mj-250-3", "mj-250", "images", "55", at(10, 20)),
        ("mj-191-1", "mj-191", "images", "191", at(10, 8)),
        ("pack-1", "pack", "images", "600", at(10, 12)),
        ("tokens-1", "tokens", "input_tokens", "12000000", at(10, 5)),
        ("tokens-2", "tokens", "output_tokens", "3000000", at(10, 20)),
        ("sketch-1", "sketch", "images", "100", at(10, 3)),
        ("sketch-2", "sketch", "images", "30", at(10, 25)),
    ],
    "2026-11/events": [
        ("mj-250-4", "mj-250", "images", "30", at(11, 3)),
        ("pack-2", "pack", "images", "100", at(11, 5)),
        ("pack-3", "pack", "images", "10", at(11, 15, 0)),     # the pack's expiry instant
        ("tokens-3", "tokens", "input_tokens", "2000000", at(11, 4)),
        ("sketch-3", "sketch", "images", "115", at(11, 10)),
    ],
}
CLOSE_PURCHASES = [("P-1", "pack", "1000", "20.00", "USD", "2026-10-10T09:00:00Z", "2026-11-15T00:00:00Z")]

Revenue = dict[str, tuple[int, int, int, int, int]]   # stream -> opening, billed, recognized, breakage, closing
ZERO_ROW = (0, 0, 0, 0, 0)


@dataclass(frozen=True)
class Story:
    customer: str
    arithmetic: str
    lines: dict[str, tuple[tuple[str, str, int], ...]]            # period -> (kind, quantity, amount_minor)
    ledger: dict[str, tuple[tuple[str, str, str, str], ...]]      # period -> (grant_id, kind, credits, balance_after)
    revenue: dict[str, Revenue]
    alerts: dict[str, tuple[tuple[str, str, str, str], ...]]      # period -> (kind, threshold, value, occurred_on)
    bugs: dict[tuple[str, str], str] = None                       # (table, period) -> xfail reason



STORIES = [
    Story("mj-250", "Midjourney-like, 250 images in Oct = 200 grant + 50 of one top-up (100 for 4.00): billed "
                    "10.00 + 4.00 = 14.00, recognized 200x0.05 + 50x0.04 = 12.00, 50 top-up credits (2.00) "
                    "carried; Nov 30 of 200 used = 1.50, 170x0.05 = 8.50 breakage",
          lines={"2026-10": (("fixed_fee", "31", 1000), ("usage", "0", 0), ("top_up", "100", 400)),
                 "2026-11": (("fixed_fee", "30", 1000), ("usage", "0", 0))},
          ledger={"2026-10": (("sub-mj-250/2026-10/g1", "grant", "200", "200"),
                              ("sub-mj-250/2026-10/g1", "consume", "-150", "50"),
                              ("sub-mj-250/2026-10/g1", "consume", "-45", "5"),          # 5 < 10: a pack
                              ("sub-mj-250/2026-10/top_up1", "top_up", "100", "105"),
                              ("sub-mj-250/2026-10/g1", "consume", "-5", "100"),         # expiring first
                              ("sub-mj-250/2026-10/top_up1", "consume", "-50", "50")),   # the grant is spent: no expiry
                  "2026-11": (("sub-mj-250/2026-11/g1", "grant", "200", "250"),
                              ("sub-mj-250/2026-11/g1", "consume", "-30", "220"),
                              ("sub-mj-250/2026-11/g1", "expire", "-170", "50"))},
          revenue={"2026-10": {"credits": (0, 1400, 1200, 0, 200), "fixed_fee": ZERO_ROW, "usage": ZERO_ROW},
                   "2026-11": {"credits": (200, 1000, 150, 850, 200), "fixed_fee": ZERO_ROW, "usage": ZERO_ROW}},
          alerts={"2026-10": (("auto_top_up", "1", "4.00", "2026-10-10"),), "2026-11": ()}),
    Story("mj-191", "Midjourney-like, 191 images leave 9 < 10: a pack is bought with 9 of the grant unused; "
                    "9x0.05 = 0.45 breakage at Oct end, the pack (4.00) deferred through Nov; Nov grant unused "
                    "= 10.00 breakage",
          lines={"2026-10": (("fixed_fee", "31", 1000), ("usage", "0", 0), ("top_up", "100", 400)),
                 "2026-11": (("fixed_fee", "30", 1000), ("usage", "0", 0))},
          ledger={"2026-10": (("sub-mj-191/2026-10/g1", "grant", "200", "200"),
                              ("sub-mj-191/2026-10/g1", "consume", "-191", "9"),
                              ("sub-mj-191/2026-10/top_up1", "top_up", "100", "109"),
                              ("sub-mj-191/2026-10/g1", "expire", "-9", "100")),         # at Nov 1 00:00, in October
                  "2026-11": (("sub-mj-191/2026-11/g1", "grant", "200", "300"),
                              ("sub-mj-191/2026-11/g1", "expire", "-200", "100"))},
          revenue={"2026-10": {"credits": (0, 1400, 955, 45, 400), "fixed_fee": ZERO_ROW, "usage": ZERO_ROW},
                   "2026-11": {"credits": (400, 1000, 0, 1000, 400), "fixed_fee": ZERO_ROW, "usage": ZERO_ROW}},
          alerts={"2026-10": (("auto_top_up", "1", "4.00", "2026-10-08"),), "2026-11": ()}),
    Story("pack", "pack of 1000 credits for 20.00 (0.02 each) bought Oct 10: Oct 600 used = 12.00; Nov 100 used "
                  "= 2.00, 300 expire Nov 15 = 6.00 breakage; 10 images at the expiry instant bill 10x0.05 = 0.50",
          lines={"2026-10": (("usage", "0", 0), ("credit_purchase", "1000", 2000)),
                 "2026-11": (("usage", "10", 50),)},
          ledger={"2026-10": (("purchase/P-1", "purchase", "1000", "1000"),
                              ("purchase/P-1", "consume", "-600", "400")),
                  "2026-11": (("purchase/P-1", "consume", "-100", "300"),
                              ("purchase/P-1", "expire", "-300", "0"))},
          revenue={"2026-10": {"credits": (0, 2000, 1200, 0, 800), "fixed_fee": ZERO_ROW, "usage": ZERO_ROW},
                   "2026-11": {"credits": (800, 0, 200, 600, 0), "fixed_fee": ZERO_ROW, "usage": (0, 50, 50, 0, 0)}},
          alerts={"2026-10": (), "2026-11": (("credits_exhausted", "0", "10", "2026-11-15"),)}),
    Story("tokens", "money wallet 50.00 (allocated of the 60.00 fee): 12M input x2.50/1M = 30.00 covered, 3M output "
                    "x10/1M = 30.00 -> 20.00 covered, 10.00 = 1M output billed; Nov 2M input x2.50/1M = 5.00 billed",
          lines={"2026-10": (("fixed_fee", "31", 6000), ("usage", "0", 0), ("usage", "1000000", 1000)),
                 "2026-11": (("fixed_fee", "30", 6000), ("usage", "2000000", 500), ("usage", "0", 0))},
          ledger={"2026-10": (("sub-tokens/once/g1", "grant", "50", "50"),
                              ("sub-tokens/once/g1", "consume", "-30", "20"),
                              ("sub-tokens/once/g1", "consume", "-20", "0")),
                  "2026-11": ()},
          revenue={"2026-10": {"credits": (0, 5000, 5000, 0, 0), "fixed_fee": (0, 1000, 1000, 0, 0),
                               "usage": (0, 1000, 1000, 0, 0)},
                   "2026-11": {"credits": ZERO_ROW, "fixed_fee": (0, 6000, 6000, 0, 0), "usage": (0, 500, 500, 0, 0)}},
          alerts={"2026-10": (("credits_exhausted", "0", "10", "2026-10-20"),),
                  "2026-11": (("credits_exhausted", "0", "5", "2026-11-04"),)}),
    Story("sketch", "block with grace 20: Oct 100 granted, 100 + 30 used -> 20 graced x0.10 = 2.00, 10 blocked; "
                    "Nov 115 -> 15 graced (grace resets each period) x0.10 = 1.50",
          lines={"2026-10": (("fixed_fee", "31", 500), ("usage", "20", 200)),
                 "2026-11": (("fixed_fee", "30", 500), ("usage", "15", 150))},
          ledger={"2026-10": (("sub-sketch/2026-10/g1", "grant", "100", "100"),
                              ("sub-sketch/2026-10/g1", "consume", "-100", "0")),
                  "2026-11": (("sub-sketch/2026-11/g1", "grant", "100", "100"),
                              ("sub-sketch/2026-11/g1", "consume", "-100", "0"))},
          revenue={"2026-10": {"fixed_fee": (0, 500, 500, 0, 0), "usage": (0, 200, 200, 0, 0)},   # free credits:
                   "2026-11": {"fixed_fee": (0, 500, 500, 0, 0), "usage": (0, 150, 150, 0, 0)}},  # no credits row
          alerts={"2026-10": (("credits_exhausted", "0", "30", "2026-10-25"),
                              ("credits_low", "10", "0", "2026-10-03")),
                  "2026-11": (("credits_exhausted", "0", "15", "2026-11-10"),
                              ("credits_low", "10", "0", "2026-11-10"))}),
    Story("prorated", "allocated 10.00 prorated: Oct 15-31 17/31 = 5.48, Nov 1-16 16/30 = 5.33, unused: "
                      "credits billed and broken 5.48 then 5.33",
          lines={"2026-10": (("fixed_fee", "17", 548), ("usage", "0", 0)),
                 "2026-11": (("fixed_fee", "16", 533), ("usage", "0", 0))},
          ledger={"2026-10": (("sub-prorated/2026-10/g1", "grant", "200", "200"),
                              ("sub-prorated/2026-10/g1", "expire", "-200", "0")),
                  "2026-11": (("sub-prorated/2026-11/g1", "grant", "200", "200"),
                              ("sub-prorated/2026-11/g1", "expire", "-200", "0"))},
          revenue={"2026-10": {"credits": (0, 548, 0, 548, 0), "fixed_fee": ZERO_ROW, "usage": ZERO_ROW},
                   "2026-11": {"credits": (0, 533, 0, 533, 0), "fixed_fee": ZERO_ROW, "usage": ZERO_ROW}},
          alerts={"2026-10": (), "2026-11": ()},
          ),
]
CLOSE_PERIODS = ("2026-10", "2026-11")


def story_params(what: str):
    params = []
    for s in STORIES:
        for period in CLOSE_PERIODS:
            reason = (s.bugs or {}).get((what, period))
            marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
            params.append(pytest.param(s, period, id=f"{s.customer} {period}: {s.arithmetic}", marks=marks))
    return params


@pytest.fixture(scope="module")
def closed(prefect_server, tmp_path_factory) -> dict[str, dict[str, pl.DataFrame]]:
    """One store closed for 2026-10 and then 2026-11: period -> table name -> frame."""
    root = tmp_path_factory.mktemp("credits")
    store_uri, plans_dir = write_store(
        root, CLOSE_PLANS, [c for c, *_ in CLOSE_SUBS],
        [(f"sub-{c}", c, p, start, end) for c, p, start, end in CLOSE_SUBS],
        {name: [(e, c, m, q, iso(t)) for e, c, m, q, t in rows] for name, rows in CLOSE_USAGE.items()},
        CLOSE_PURCHASES)
    out = {}
    for period in CLOSE_PERIODS:
        result = close(store_uri, plans_dir, period)
        assert result["status"] == "closed"
        out[period] = {name: table(store_uri, period, f"{name}.parquet")
                       for name in ("invoices", "invoice_lines", "credit_ledger", "revenue", "journal", "alerts")}
    return out


def _of(frame: pl.DataFrame, customer: str) -> pl.DataFrame:
    return frame.filter(pl.col("customer_id") == customer)


@pytest.mark.parametrize("story, period", story_params("lines"))
def test_invoice_lines(closed, story, period):
    lines = _of(closed[period]["invoice_lines"], story.customer).sort("line_no")
    assert list(lines.select("kind", "quantity", "amount_minor").iter_rows()) == list(story.lines[period])
    invoice = _of(closed[period]["invoices"], story.customer)
    assert invoice["total_minor"].to_list() == [sum(amount for *_, amount in story.lines[period])]


@pytest.mark.parametrize("story, period", story_params("ledger"))
def test_credit_ledger(closed, story, period):
    ledger = _of(closed[period]["credit_ledger"], story.customer)
    assert list(ledger.select("grant_id", "kind", "credits", "balance_after").iter_rows()) == list(story.ledger[period])
    assert set(ledger["period"]) <= {period}


@pytest.mark.parametrize("story, period", story_params("revenue"))
def test_revenue(closed, story, period):
    revenue = _of(closed[period]["revenue"], story.customer)
    got = {r["stream"]: (r["opening_deferred_minor"], r["billed_minor"], r["recognized_minor"], r["breakage_minor"],
                         r["closing_deferred_minor"]) for r in revenue.iter_rows(named=True)}
    assert got == story.revenue[period]


@pytest.mark.parametrize("story, period", story_params("alerts"))
def test_credit_alerts(closed, story, period):
    alerts = _of(closed[period]["alerts"], story.customer).sort("kind", "threshold", "occurred_on")
    got = [(k, t, D(v), d.isoformat()) for k, t, v, d in alerts.select("kind", "threshold", "value",
                                                                       "occurred_on").iter_rows()]
    assert got == [(k, t, D(v), d) for k, t, v, d in story.alerts[period]]


@pytest.mark.parametrize("story, period", story_params("receivable"))
def test_journal_receivable_equals_the_invoices(closed, story, period):
    journal_rows = _of(closed[period]["journal"], story.customer).filter(pl.col("account") == "accounts_receivable")
    receivable = journal_rows["debit_minor"].sum() - journal_rows["credit_minor"].sum()
    assert receivable == _of(closed[period]["invoices"], story.customer)["total_minor"].sum()


@pytest.mark.parametrize("period", CLOSE_PERIODS)
def test_journal_balances_and_follows_the_revenue_rows(closed, period):
    entries, revenue = closed[period]["journal"], closed[period]["revenue"]
    assert entries.height > 0
    assert entries["debit_minor"].sum() == entries["credit_minor"].sum()
    credits = revenue.filter(pl.col("stream") == "credits")
    for r in credits.iter_rows(named=True):
        rows = entries.filter((pl.col("customer_id") == r["customer_id"]) & (pl.col("stream") == "credits"))
        net = lambda account, rows=rows: (rows.filter(pl.col("account") == account)["credit_minor"].sum()  # noqa: E731
                               - rows.filter(pl.col("account") == account)["debit_minor"].sum())
        assert net("deferred_revenue") == r["closing_deferred_minor"] - r["opening_deferred_minor"]
        assert net("revenue") == r["recognized_minor"]
        assert net("breakage_revenue") == r["breakage_minor"]


def test_november_opens_with_octobers_closing_deferred_per_customer_and_stream(closed):
    keys = ["customer_id", "stream", "currency"]
    october = closed["2026-10"]["revenue"].select(*keys, "closing_deferred_minor")
    november = closed["2026-11"]["revenue"].select(*keys, "opening_deferred_minor")
    joined = october.join(november, on=keys, how="full", coalesce=True).fill_null(0)
    assert joined.height >= len(STORIES)
    assert joined.filter(pl.col("closing_deferred_minor") != pl.col("opening_deferred_minor")).to_dicts() == []
    assert october.filter(pl.col("closing_deferred_minor") > 0)["customer_id"].sort().to_list() == [
        "mj-191", "mj-250", "pack"]


@pytest.mark.parametrize("customer", [s.customer for s in STORIES if s.customer != "sketch"])
def test_credits_billed_over_both_periods_are_recognized_broken_or_still_deferred(closed, customer):
    rows = {p: _of(closed[p]["revenue"], customer).filter(pl.col("stream") == "credits").row(0, named=True)
            for p in CLOSE_PERIODS}
    billed = sum(rows[p]["billed_minor"] for p in CLOSE_PERIODS)
    taken = sum(rows[p]["recognized_minor"] + rows[p]["breakage_minor"] for p in CLOSE_PERIODS)
    assert rows["2026-10"]["opening_deferred_minor"] == 0
    assert billed == taken + rows["2026-11"]["closing_deferred_minor"] > 0


def test_credits_billed_are_the_top_up_purchase_and_allocated_amounts(closed):
    # mj-250 in October: 1000 allocated out of the 1000 fee + 400 top-up line = 1400 in credits
    for period in CLOSE_PERIODS:
        lines = closed[period]["invoice_lines"]
        revenue = closed[period]["revenue"]
        for customer in ("mj-250", "mj-191", "pack"):
            bought = (_of(lines, customer).filter(pl.col("kind").is_in(["top_up", "credit_purchase"]))
                      ["amount_minor"].sum())
            allocated = 1000 if customer.startswith("mj") else 0
            credits = _of(revenue, customer).filter(pl.col("stream") == "credits")["billed_minor"].sum()
            assert credits == bought + allocated, (period, customer)


def test_ledger_rows_chain_from_october_into_november_and_never_go_negative(closed):
    last: dict[str, D] = defaultdict(D)
    for period in CLOSE_PERIODS:
        ledger = closed[period]["credit_ledger"]
        assert ledger["entry_id"].to_list() == [f"L-{period}-{n:08d}" for n in range(1, ledger.height + 1)]
        for customer, credits, balance in ledger.select("customer_id", "credits", "balance_after").iter_rows():
            assert last[customer] + D(credits) == D(balance) >= 0
            last[customer] = D(balance)
    # a period_end expiry at Nov 1 00:00 is October's; nothing of November happens before Nov 1
    october = closed["2026-10"]["credit_ledger"]
    assert october.filter(pl.col("kind") == "expire")["occurred_at"].to_list() == [
        datetime(2026, 11, 1, tzinfo=timezone.utc)] * 2                     # mj-191 and prorated
    november = closed["2026-11"]["credit_ledger"]
    assert november["occurred_at"].min() == datetime(2026, 11, 1, tzinfo=timezone.utc)
    assert november.filter(pl.col("kind") == "expire")["occurred_at"].sort().to_list() == [
        datetime(2026, 11, 15, tzinfo=timezone.utc)] + [datetime(2026, 12, 1, tzinfo=timezone.utc)] * 3


def test_one_top_up_line_per_pack_and_none_in_november(closed):
    for period, expected in (("2026-10", ["mj-191", "mj-250"]), ("2026-11", [])):
        top_ups = closed[period]["invoice_lines"].filter(pl.col("kind") == "top_up")
        assert top_ups["customer_id"].sort().to_list() == expected
        assert set(top_ups["amount_minor"]) <= {400}


def test_a_balance_brought_forward_is_the_grants_opening_in_the_balances_table():
    # A nightly run started from the previous close carries each grant in as an `opening` entry:
    # the balances table must show it as opening (as the invoice's credit summary does), not as
    # a negative roll-over.
    from transforms.credits.ledger import balances_table
    from transforms.credits.model import Grant
    from transforms.credits.reports import credit_summaries
    start = OCT.start_at
    carried = Grant("s1/2026-09/g1", "c1", "s1", "opening", start, None, D(40), D(0), "USD")
    replay = WalletReplay()
    replay.grants[carried.grant_id] = carried
    replay.entries += [Entry("c1", carried.grant_id, "opening", D(40), D(40), start, None, D(0), "s1"),
                        Entry("c1", carried.grant_id, "consume", D(-15), D(25), start + timedelta(days=3), None,
                              D(0), "s1", "e1", "images")]
    row = balances_table(replay, OCT).row(0, named=True)
    assert (row["opening"], row["granted"], row["consumed"], row["rolled_over"], row["closing"]) == (
        "40", "0", "15", "0", "25")
    movement = credit_summaries(replay, OCT)["c1"].grants[0]
    assert (movement.opening, movement.used, movement.closing) == (D(40), D(15), D(25))
