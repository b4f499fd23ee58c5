"""HTTP APIs and the command line."""
