"""Collectors: read the engine's surroundings (GPUs, ...) in the background and
expose what they saw as metrics and state. One subpackage per source."""
