"""Training: the loop, EMA, and atomic training-state checkpoints."""
