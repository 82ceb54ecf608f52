"""`sentinel doctor`: pre-flight and live checks of the host, the config and the model.

Each check is a small function of ``(cfg, Host)`` returning a ``Result`` (pass, warn,
fail or skip, with its fix in one line). ``Host`` carries every path and reading a check
uses, so tests inject a fake ``/proc``, ``/dev/shm``, cgroup tree, NVML or vLLM.
"""

from sentinel.doctor.base import Host, Result, Status
from sentinel.doctor.checks import CHECKS, run_checks

__all__ = ["CHECKS", "Host", "Result", "Status", "run_checks"]
