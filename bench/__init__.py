"""Benchmarks; each writes its results to docs/."""
