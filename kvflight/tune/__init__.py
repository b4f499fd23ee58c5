"""Deployment tools: the memory planner (`kvflight plan`), the GPU topology advisor (`kvflight topo`) and the
autotuner (`kvflight tune`). planner and topo are pure (no torch) so the engine can import them."""
