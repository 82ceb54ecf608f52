"""Probes: find out whether the engine really serves, and whether it makes progress.

engine -> inference probe (a real 1-token completion) + engine /metrics scrape
       -> readiness checks, stall detection -> ``EngineStatus`` -> /startupz /readyz
"""
