"""Transfer to text unlike the training text, and the learning curve in training tokens."""
