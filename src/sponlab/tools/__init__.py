"""Tools around the pipeline: device smoke run, lm-eval tasks, run comparison, the sparse GEMV kernel."""
