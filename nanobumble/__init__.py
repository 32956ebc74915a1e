"""nanobumble: train a small language model from nothing, in plain PyTorch."""
