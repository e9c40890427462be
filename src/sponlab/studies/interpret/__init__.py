"""What the biases encode: statistics, alignment, residual directions, hidden shift, prompts, similarity."""
