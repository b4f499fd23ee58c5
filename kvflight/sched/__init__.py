"""In-flight batching scheduler: spends the token budget; sees block ids, never tensors."""
