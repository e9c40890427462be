"""All figures of sponlab (matplotlib, Agg backend, PNG), one submodule per analysis."""
