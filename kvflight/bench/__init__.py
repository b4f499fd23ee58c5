"""Benchmarks: datasets, static-batch latency, serving load generator."""
