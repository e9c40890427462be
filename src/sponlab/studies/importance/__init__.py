"""Per-layer activation / gradient importance, optionally through sparse autoencoders (SAEs)."""
