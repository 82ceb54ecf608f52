"""Lifecycle operations: graceful drain, resume, restart, preemption notices (issue 16)."""
