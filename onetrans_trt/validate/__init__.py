"""Validation: every backend against the float32 PyTorch model, in numbers and in ranking
terms, with a first-divergence finder and JSON/HTML reports a CI job can gate on."""
