"""Memory planner, autotuner and topology advisor."""
