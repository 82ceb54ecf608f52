"""Watchdogs inside and around the engine (issue 17).

engine processes -> agent (sitecustomize) -> unix datagram -> GcWatch -> pause histograms
engine processes -> psutil / GPU snapshot -> LeakWatch (Theil-Sen trend), StuckWatch
StuckWatch / probes' stall / readiness / a hang restart -> Capturer (py-spy) -> incidents
"""
