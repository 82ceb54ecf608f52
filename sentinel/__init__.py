"""Sentinel: an SRE sidecar that launches and guards a vLLM inference server."""

__version__ = "0.1.0"
