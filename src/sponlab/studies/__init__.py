"""One folder per companion study: its params, analysis and figures together."""
