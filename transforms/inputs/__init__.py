"""The boundary: raw inputs in, checked frames out (usage, customers and subscriptions, plans,
adjustments), and the guards that refuse a close its inputs would get wrong."""
