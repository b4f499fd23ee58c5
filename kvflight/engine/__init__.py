"""Engine: the only place where the scheduler and the runner meet; offline LLM API."""
