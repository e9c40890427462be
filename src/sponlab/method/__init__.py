"""The method a researcher changes: TEAL sparsification and calibration, SPON biases, training, evaluation."""
