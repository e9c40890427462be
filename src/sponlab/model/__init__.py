"""Models and places in them: loading, the base model's identity, typed sites, hooks, input capture, tiny models."""
