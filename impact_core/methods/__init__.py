"""Algorithms: tensors and plain arguments in, tensors out (no Config, no cache)."""
