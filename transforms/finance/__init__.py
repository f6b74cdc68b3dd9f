"""Finance tables a run publishes or a command compares: revenue and its journal, margins,
corrections of closed periods, spend alerts and period alerts, simulate and impact."""
