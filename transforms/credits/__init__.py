"""The credit wallet: grants, purchases, top-ups, consumption and expiry, replayed in event time.

One module per idea; import names from the module that holds them:

- `model`: purchases, credit events, grants, ledger entries and what a replay gives back (`WalletReplay`).
- `grants`: the grant schedule (plan grants, purchased packs, expiry, the price booked).
- `wallet`: the engine: one customer's wallet, its draw order, top-ups, alerts and grace.
- `replay`: every customer's wallet through a period (`replayed_wallets`).
- `opening`: a period's wallets started from the previous close's balances.
- `checkpoint`: nightly runs resuming each wallet from the last night's state
  (`replayed_wallets_and_checkpoint`).
- `events`: the settled usage that wallets consume, and the rows left for the charges.
- `ledger`: the credit_ledger and credit_balances tables, and which period an entry is in.
- `lines`: invoice lines for credits bought (auto top-ups, purchased packs).
- `purchases`: the credit_purchases input, read and checked.
- `reports`: per plan and per customer summaries of a period's movements.
"""
