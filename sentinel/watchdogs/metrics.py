"""Metric families of the watchdogs, registered in the app's registry (no globals).

Names the alert rules rely on: ``sentinel_gc_pause_seconds{role}``,
``sentinel_gc_pauses_over_limit_total{role}``,
``sentinel_process_memory_growth_bytes_per_second{role}``,
``sentinel_process_memory_time_to_limit_seconds{role}`` (+Inf while the process is
not growing; absent until the window holds ``watchdogs.leak.min_samples`` samples),
``sentinel_dumps_total{reason,outcome}``, ``sentinel_watchdog_agent_up{role}``,
``sentinel_stuck_worker{role}``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# from 100 us (a young collection) to a minute (a full collection of a huge heap)
GC_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class WatchdogMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        r = registry
        self.gc_pause = Histogram(
            "sentinel_gc_pause_seconds",
            "Garbage-collector pauses of Sentinel and of the engine's Python processes.",
            ["role", "gc_generation"],
            buckets=GC_BUCKETS,
            registry=r,
        )
        self.gc_over_limit = Counter(
            "sentinel_gc_pauses_over_limit",
            "Collections that paused a process longer than watchdogs.gc.pause_limit_s.",
            ["role"],
            registry=r,
        )
        self.gc_collected = Counter(
            "sentinel_gc_collected_objects",
            "Objects freed by the garbage collector.",
            ["role"],
            registry=r,
        )
        self.gc_tracked = Gauge(
            "sentinel_gc_tracked_objects",
            "Objects tracked by the garbage collector (largest process of the role; "
            "measured every watchdogs.agent.tracked_objects_interval_s).",
            ["role"],
            registry=r,
        )
        self.agent_up = Gauge(
            "sentinel_watchdog_agent_up",
            "1 while every engine process of the role reports through the agent.",
            ["role"],
            registry=r,
        )
        self.agent_dropped = Counter(
            "sentinel_watchdog_agent_dropped_reports",
            "Agent reports that were malformed, from unknown processes, or lost.",
            ["reason"],
            registry=r,
        )
        self.mem_growth = Gauge(
            "sentinel_process_memory_growth_bytes_per_second",
            "Robust (Theil-Sen) growth rate of resident memory over watchdogs.leak.window_s "
            "(fastest-growing process of the role).",
            ["role"],
            registry=r,
        )
        self.mem_ttl = Gauge(
            "sentinel_process_memory_time_to_limit_seconds",
            "Predicted time until memory reaches its limit at the current growth rate "
            "(+Inf when not growing).",
            ["role"],
            registry=r,
        )
        self.gpu_mem_growth = Gauge(
            "sentinel_process_gpu_memory_growth_bytes_per_second",
            "Robust growth rate of the GPU memory the processes of the role hold.",
            ["role"],
            registry=r,
        )
        self.gpu_mem_ttl = Gauge(
            "sentinel_process_gpu_memory_time_to_limit_seconds",
            "Predicted time until the GPU's memory is full at that rate (+Inf when not growing).",
            ["role"],
            registry=r,
        )
        self.leak_suspected = Gauge(
            "sentinel_watchdog_leak_suspected",
            "1 while a process of the role grows past watchdogs.leak thresholds.",
            ["role"],
            registry=r,
        )
        self.stuck = Gauge(
            "sentinel_stuck_worker",
            "1 while a process of the role burns a core while its GPU idles (watchdogs.stuck).",
            ["role"],
            registry=r,
        )
        self.dumps = Counter(
            "sentinel_dumps",
            "Stack dumps of engine processes, by what asked for them and how they ended.",
            ["reason", "outcome"],
            registry=r,
        )
        self.dump_seconds = Histogram(
            "sentinel_dump_duration_seconds",
            "Time one py-spy dump of one engine process took.",
            ["role"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=r,
        )
        self.watchdog_cpu = Counter(
            "sentinel_watchdog_cpu_seconds",
            "CPU time Sentinel's thread spent in the watchdogs' sampling.",
            ["watchdog"],
            registry=r,
        )
