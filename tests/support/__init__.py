"""Helpers shared by tests and benchmarks (benchmarks may import these; never the reverse)."""
