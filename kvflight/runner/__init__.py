"""Owns the device: KV tensors, input buffers, forward pass and sampler."""
