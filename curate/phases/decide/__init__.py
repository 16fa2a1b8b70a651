"""Phase 3, decide: the rules table applied, duplicates and the style rebalance."""
