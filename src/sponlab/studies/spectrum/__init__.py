"""Weight-spectrum analysis of a causal LM and its report."""
