"""The engine supervisor: launch vLLM, own its process tree, reap, restart, stop."""
