"""Benchmarks: measured, never asserted. See `python -m loadtests --help` (issue 8 grows this
into the full harness with a peer and a raw ceiling)."""
