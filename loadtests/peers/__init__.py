"""Servers to compare against, run by the benchmark on the same machine, same scenario."""
