"""Planning a GPU run without a GPU: per-GPU memory of the real training step (run on fake tensors),
the largest micro-batch that fits, and a roofline bound on the step time."""
