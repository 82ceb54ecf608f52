"""Benchmarks: run one as `.venv/bin/python -m bench.<name>`."""
