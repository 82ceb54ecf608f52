"""GPU telemetry through NVML (issue 4).

nvml.py (the pynvml boundary, safe reads) -> poller.py (background thread, snapshots,
XID events) -> collector.py (``sentinel_gpu_*`` at scrape time) and health.py
(``degraded`` reasons). ``fake.py`` is an in-memory NVML for tests and the bench.
"""

from sentinel.collectors.gpu.collector import GpuCollector
from sentinel.collectors.gpu.poller import GpuPoller, gpu_processes
from sentinel.collectors.gpu.sample import GpuSample, GpuSnapshot

__all__ = ["GpuCollector", "GpuPoller", "GpuSample", "GpuSnapshot", "gpu_processes"]
