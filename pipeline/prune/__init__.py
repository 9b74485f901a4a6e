"""Channel pruning: PDD gates on channel groups and exact slimming of the gated network."""
