"""Fuzz targets, run for minutes by hand (a bounded run of each is in the test suite)."""
