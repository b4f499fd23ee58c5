"""Compute kernels: one Triton kernel per file; reference.py holds the plain-torch oracles."""
