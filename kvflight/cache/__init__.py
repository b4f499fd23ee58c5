"""KV block pool, prefix index and host tier: pure Python + numpy, no torch."""
