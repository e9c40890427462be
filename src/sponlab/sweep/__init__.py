"""The sweep over configs and sparsities: summary, the study's findings, the report, a finished run's results."""
