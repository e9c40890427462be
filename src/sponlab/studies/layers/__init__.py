"""Which layers' biases matter: leave-one-layer-out, cumulative benefit, the layer-drift analysis."""
