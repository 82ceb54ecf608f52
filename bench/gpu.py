"""GPU telemetry cost: one full poll per GPU, idle and busy, and /metrics render time.

    .venv/bin/python -m bench.gpu [--polls 1000] [--load idle,busy] [--fake] [--out DIR]

Side by side in one run, for each GPU condition in ``--load`` (``idle``; ``busy``: the
device-to-device copy loop ``tests/gpu/copy_loop.py`` running all along, like an engine
decoding; ``light``: the same at ~10% duty):
- poll: Sentinel's poll of one GPU (``GpuDevice.sample``: cheap counters in one
  field-values call, GPM, maxima cached; slow reads between polls) vs. a naive
  gpustat-style poll (one NVML call per value, maxima, utilization rates and every
  counter each time); p50/p99/max in microseconds and the ratio, back to back and
  spaced out ``--spaced-s`` apart like production polls (the driver's caches go cold
  between polls, so spaced is the figure to judge the goal by: p99 <= 1 ms per GPU);
- the slow reads Sentinel makes halfway between two spaced polls (``refresh_slow``:
  expensive counters, graphics processes; at most one per gap), per read, and the
  NVML time per poll interval with them (poll + that gap's slow read);
- the cost of each NVML function inside a Sentinel poll (mean, p99 and max over
  ``--per-call-polls`` spaced polls), and each counter group's read cost as timed at
  open (field values vs. the older call);
- where a slow poll's time went: the poll thread's CPU time in each spaced poll
  (equal to the wall time: the thread was running, not waiting or preempted), the
  Python time outside NVML calls per timed poll, and for the slowest timed polls
  their largest calls, page faults and context switches; with the share of the VM's
  CPU time stolen by the hypervisor during the spaced polls (/proc/stat);
- how many spaced polls had a garbage collection inside them (the process's collector
  is set as ``sentinel run`` sets it, ``runtime.gc_*``; ``--gc default`` for CPython's);
- /metrics: ``generate_latest`` of a registry with ~40 other Sentinel-like series,
  with and without the GPU collector registered (GPU idle).

Without NVML (or with ``--fake``) the in-memory fake NVML stands in: that measures
Sentinel's own Python overhead, not the driver (and ``--load`` is ignored).
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from bench.common import CopyLoad, pct, steal_s, summarize
from sentinel.collectors.gpu.collector import GpuCollector
from sentinel.collectors.gpu.nvml import GpuDevice, Nvml, NvmlUnavailable, load_nvml
from sentinel.collectors.gpu.sample import GpuSnapshot
from sentinel.config.schema import RuntimeConfig
from sentinel.runtime import tune_gc


def summary(ns: list[int]) -> dict[str, float]:
    return summarize(ns, "us")


def naive_poll(lib: Any, h: Any) -> None:
    """What a straightforward exporter does every poll (gpustat style)."""

    def safe(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except lib.NVMLError:
            return None

    safe(lib.nvmlDeviceGetTemperature, h, 0)
    safe(lib.nvmlDeviceGetFieldValues, h, [82])
    safe(lib.nvmlDeviceGetCurrentClocksEventReasons, h)
    safe(lib.nvmlDeviceGetUtilizationRates, h)
    for clock in (1, 2):
        safe(lib.nvmlDeviceGetClockInfo, h, clock)
        safe(lib.nvmlDeviceGetMaxClockInfo, h, clock)
    safe(lib.nvmlDeviceGetPowerUsage, h)
    safe(lib.nvmlDeviceGetEnforcedPowerLimit, h)
    safe(lib.nvmlDeviceGetMemoryInfo, h)
    for policy in (0, 1):
        safe(lib.nvmlDeviceGetViolationStatus, h, policy)
    for kind in (0, 1):
        safe(lib.nvmlDeviceGetTotalEccErrors, h, kind, 0)
    safe(lib.nvmlDeviceGetRemappedRows, h)
    safe(lib.nvmlDeviceGetPcieReplayCounter, h)
    safe(lib.nvmlDeviceGetComputeRunningProcesses, h)
    safe(lib.nvmlDeviceGetGraphicsRunningProcesses, h)


class TimingLib:
    """Wraps a pynvml-like module; accumulates time per NVML function."""

    def __init__(self, lib: Any) -> None:
        self._lib = lib
        self.ns: dict[str, list[int]] = defaultdict(list)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._lib, name)
        if name == "_nvmlGetFunctionPointer":  # a C function called directly (fields.py)
            return lambda fn_name: self._timed(fn_name, attr(fn_name))
        if not name.startswith("nvml") or not callable(attr):
            return attr
        return self._timed(name, attr)

    def _timed(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            t0 = time.perf_counter_ns()
            try:
                return fn(*args)
            finally:
                self.ns[name].append(time.perf_counter_ns() - t0)

        return timed


def open_nvml(fake: bool) -> tuple[Nvml, str]:
    if not fake:
        try:
            return load_nvml(), "nvml"
        except NvmlUnavailable as exc:
            print(f"NVML unavailable ({exc}): using the fake NVML")
    from sentinel.collectors.gpu.fake import FakeGpu, FakeNvml

    gpus = [FakeGpu(compute_processes=[(1234, 1 << 30)])]
    return load_nvml(FakeNvml(gpus, ctypes_fields=True)), "fake"  # the real field path


def _timed_cpu(fn: Callable[[], object]) -> tuple[int, int]:
    """(wall ns, this thread's CPU ns) of one call: a wall time far above the CPU time
    is time the thread was not running (preempted, descheduled, or asleep in the driver)."""
    c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0, time.thread_time_ns() - c0


def _timed(fn: Callable[[], object]) -> int:
    t0 = time.perf_counter_ns()
    fn()
    return time.perf_counter_ns() - t0


LOADS = {"idle": None, "busy": (2.0, 1.0), "light": (0.5, 0.1)}  # (GiB, duty)


def per_call(ns: dict[str, list[int]], polls: int) -> dict[str, dict[str, float]]:
    """Each NVML function inside one poll: mean time per poll, p99 of one call (us)."""
    return {
        k: {
            "mean": round(sum(v) / polls / 1000, 1),
            "p99": round(pct(v, 0.99) / 1000, 1),
            "max": round(max(v) / 1000, 1),
        }
        for k, v in sorted(ns.items(), key=lambda kv: -sum(kv[1]))
    }


_GC_STARTS = [0]


def _count_gc(phase: str, _info: dict[str, Any]) -> None:
    if phase == "start":
        _GC_STARTS[0] += 1


def bench_polls(
    nvml: Nvml,
    polls: int,
    slow_every: int,
    spaced_ticks: int,
    spaced_s: float,
    per_call_polls: int = 20,
) -> list[dict[str, Any]]:
    results = []
    for device in nvml.open_devices(slow_every=slow_every):

        def naive(device: GpuDevice = device) -> None:
            naive_poll(nvml.lib, device.handle)

        for _ in range(50):
            device.sample()
        # A: back to back, interleaved with the naive poll (no slow reads)
        ours: list[int] = []
        theirs: list[int] = []
        for _ in range(polls):
            ours.append(_timed(device.sample))
            theirs.append(_timed(naive))
        # B: spaced out like production polls (driver caches go cold between polls), the
        # slow reads halfway between two polls as in the poll thread; every 4th tick is
        # a naive poll instead. A few polls first, so that reads found slow at this
        # cadence are demoted.
        for _ in range(5):
            time.sleep(spaced_s)
            device.sample()
        sp_ours: list[int] = []
        sp_theirs: list[int] = []
        with_slow: list[int] = []  # poll + the slow read in the gap before it
        slow: dict[str, list[int]] = defaultdict(list)
        polls_with_gc: list[int] = []  # a garbage collection ran inside the poll
        sp_cpu: list[int] = []  # the poll thread's CPU time in each poll
        steal0, wall0 = steal_s(), time.monotonic()
        for i in range(spaced_ticks):
            if i % 4 == 3:
                time.sleep(spaced_s)
                sp_theirs.append(_timed(naive))
                continue
            time.sleep(spaced_s / 2)
            t0 = time.perf_counter_ns()
            got = device.refresh_slow()
            gap = time.perf_counter_ns() - t0
            if got is not None:
                slow[got[0]].append(int(got[1] * 1e9))
            time.sleep(spaced_s / 2)
            gc_before = _GC_STARTS[0]
            took, cpu = _timed_cpu(device.sample)
            sp_ours.append(took)
            sp_cpu.append(cpu)
            if _GC_STARTS[0] != gc_before:
                polls_with_gc.append(sp_ours[-1])
            with_slow.append(sp_ours[-1] + (gap if got is not None else 0))
        steal_share = (steal_s() - steal0) / max(1e-9, time.monotonic() - wall0)
        # C: each NVML function inside one poll (and its slow reads), spaced
        timing = TimingLib(nvml.lib)
        probe = GpuDevice(timing, device.index, slow_every)
        probe.open()
        for _ in range(5):
            time.sleep(spaced_s)
            probe.sample()
        timing.ns.clear()
        n = per_call_polls
        anatomy: list[tuple[int, list[tuple[str, int]]]] = []  # (poll ns, its calls)
        for _ in range(n):
            time.sleep(spaced_s)
            marks = {k: len(v) for k, v in timing.ns.items()}
            r0 = resource.getrusage(resource.RUSAGE_THREAD)
            took = _timed(probe.sample)
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            calls = [(k, x) for k, v in timing.ns.items() for x in v[marks.get(k, 0) :]]
            faults = r1.ru_minflt - r0.ru_minflt + r1.ru_majflt - r0.ru_majflt
            switches = r1.ru_nivcsw - r0.ru_nivcsw + r1.ru_nvcsw - r0.ru_nvcsw
            anatomy.append((took, calls, faults, switches))
        poll_calls = per_call(timing.ns, n)
        python_ns = [took - sum(x for _, x in calls) for took, calls, _, _ in anatomy]
        slowest = [
            {
                "poll_us": round(took / 1e3, 1),
                "python_us": round((took - sum(x for _, x in calls)) / 1e3, 1),
                "calls_us": {
                    k: round(x / 1e3, 1) for k, x in sorted(calls, key=lambda c: -c[1])[:3]
                },
                "page_faults": faults,
                "context_switches": switches,
            }
            for took, calls, faults, switches in sorted(anatomy, key=lambda a: -a[0])[
                : max(3, n // 100)
            ]
        ]
        timing.ns.clear()
        n_slow = len(probe.slow_reads())
        for _ in range(n_slow * max(1, slow_every // max(1, n_slow))):
            probe.refresh_slow()
            time.sleep(spaced_s / 10)
        last = device.sample()
        results.append(
            {
                "gpu": device.index,
                "name": device.name,
                "back_to_back": {"sentinel": summary(ours), "naive": summary(theirs)},
                "spaced": {
                    "every_s": spaced_s,
                    "polls": len(sp_ours),
                    "sentinel": summary(sp_ours),
                    # how rare the slow polls are: the tail is a few slow polls, not a slow poll
                    "sentinel_over_1ms_share": round(
                        sum(1 for x in sp_ours if x > 1_000_000) / len(sp_ours), 4
                    ),
                    "naive": summary(sp_theirs),
                    "sentinel_with_the_gaps_slow_read": summary(with_slow),
                    "sentinel_thread_cpu": summary(sp_cpu),
                    "host_steal_share": round(steal_share, 4),
                    "slow_reads_between_polls": {
                        k: {"count": len(v), **summary(v)} for k, v in sorted(slow.items())
                    },
                    "nvml_us_per_interval_mean": round(sum(with_slow) / len(with_slow) / 1e3, 1),
                    "polls_with_a_gc": {
                        "count": len(polls_with_gc),
                        "us": [round(x / 1e3, 1) for x in polls_with_gc],
                    },
                },
                "per_call_polls": n,
                "per_call_spaced_us": poll_calls,
                "slowest_timed_polls": slowest,
                "python_per_timed_poll": summary(python_ns),
                "page_faults_per_timed_poll_mean": sum(a[2] for a in anatomy) / max(1, n),
                "per_call_slow_reads_us": {
                    k: round(sum(v) / len(v) / 1000, 1) for k, v in timing.ns.items()
                },
                "counter_read_costs_at_open_us": {
                    g: {how: round(t * 1e6, 1) for how, t in c.items()}
                    for g, c in device.read_costs.items()
                },
                "counter_plan": dict(device.counter_plan),
                "slow_reads": [name for name, _ in device.slow_reads()],
                "unsupported": dict(last.unsupported_reads),
                "read_errors": {f"{f}:{e}": n for (f, e), n in last.read_errors.items()},
            }
        )
        probe.close()
        device.close()
    return results


def other_metrics(registry: CollectorRegistry) -> None:
    """~40 series standing in for the rest of Sentinel's /metrics."""
    Gauge("sentinel_engine_state", "x", ["state"], registry=registry).labels("ready").set(1)
    c = Counter("sentinel_requests", "x", ["tier", "code"], registry=registry)
    for tier in ("local", "backup"):
        for code in ("200", "429", "500", "503"):
            c.labels(tier, code).inc(7)
    h = Histogram("sentinel_request_duration_seconds", "x", ["tier"], registry=registry)
    for tier in ("local", "backup"):
        h.labels(tier).observe(0.2)


def bench_render(nvml: Nvml, renders: int) -> dict[str, Any]:
    from sentinel.collectors.gpu.poller import GpuPoller
    from sentinel.config.schema import GpuConfig
    from sentinel.state import EngineStatus

    poller = GpuPoller(GpuConfig(), EngineStatus(), load=lambda: nvml)
    assert poller.open()
    poller.poll_once()
    time.sleep(0.1)
    poller.refresh_slow()
    time.sleep(0.1)
    poller.poll_once()
    base = CollectorRegistry()
    other_metrics(base)
    with_gpu = CollectorRegistry()
    other_metrics(with_gpu)
    with_gpu.register(GpuCollector(lambda: poller.snapshot))
    out: dict[str, Any] = {}
    for label, reg in (("without_gpu", base), ("with_gpu", with_gpu)):
        for _ in range(20):
            generate_latest(reg)
        ns = []
        for _ in range(renders):
            t0 = time.perf_counter_ns()
            generate_latest(reg)
            ns.append(time.perf_counter_ns() - t0)
        out[label] = {**summary(ns), "bytes": len(generate_latest(reg))}
    # no NVML: the collector alone, as on a CPU host
    empty = CollectorRegistry()
    empty.register(GpuCollector(lambda: GpuSnapshot(available=False)))
    out["gpu_series"] = sum(
        1 for line in generate_latest(with_gpu).splitlines() if line[:1] != b"#"
    )
    out["no_gpu_exposition"] = generate_latest(empty).decode().strip().splitlines()[-1]
    for device in poller.devices:
        device.close()
    return out


def print_polls(r: dict[str, Any], load: str, kind: str, args: argparse.Namespace) -> None:
    sp = r["spaced"]
    print(f"\n== GPU {r['gpu']} {r['name']} ({kind}), GPU {load}: one full poll, microseconds")
    print(f"{'':<48}{'p50':>9}{'p99':>9}{'max':>9}")
    rows = [
        (f"back to back x{args.polls}: sentinel", r["back_to_back"]["sentinel"]),
        ("back to back: naive (gpustat-style)", r["back_to_back"]["naive"]),
        (f"{args.spaced_s} s apart x{sp['polls']}: sentinel", sp["sentinel"]),
        ("  + the slow read made in the gap before it", sp["sentinel_with_the_gaps_slow_read"]),
        ("  its thread's CPU time in the poll", sp["sentinel_thread_cpu"]),
        (f"{args.spaced_s} s apart: naive", sp["naive"]),
    ]
    for label, st in rows:
        if "p50_us" in st:
            print(f"{label:<48}{st['p50_us']:>9}{st['p99_us']:>9}{st['max_us']:>9}")
    for name, st in sp["slow_reads_between_polls"].items():
        label = f"  slow read between polls: {name} x{st['count']}"
        print(f"{label:<48}{st['p50_us']:>9}{st['p99_us']:>9}{st['max_us']:>9}")
    for phase in ("back_to_back", "spaced"):
        o, t = r[phase]["sentinel"], r[phase]["naive"]
        print(
            f"    {phase}: sentinel/naive p50 {o['p50_us'] / t['p50_us']:.2f}"
            f" p99 {o['p99_us'] / t['p99_us']:.2f}"
        )
    p99 = sp["sentinel"]["p99_us"]
    print(
        f"    goal p99 <= 1000 us per GPU (spaced polls, GPU {load}):"
        f" {'met' if p99 <= 1000 else 'MISSED'} ({p99} us; polls over 1 ms:"
        f" {sp['sentinel_over_1ms_share'] * 100:.1f}%); NVML time per poll interval,"
        f" slow reads included: mean {sp['nvml_us_per_interval_mean']} us"
    )
    calls = ", ".join(
        f"{k} {v['mean']}/{v['p99']}/{v['max']}" for k, v in r["per_call_spaced_us"].items()
    )
    gcs = r["spaced"]["polls_with_a_gc"]
    print(f"    spaced polls with a garbage collection inside: {gcs['count']} {gcs['us']} us")
    print(f"    per NVML call in a spaced poll (us per poll, mean/p99 of one call): {calls}")
    py = r["python_per_timed_poll"]
    print(
        f"    Python outside NVML calls per timed poll: p50 {py['p50_us']} p99 {py['p99_us']}"
        f" max {py['max_us']} us; CPU time the hypervisor stole from this VM during the "
        f"spaced polls: {sp['host_steal_share'] * 100:.2f}%; page faults per timed poll "
        f"{r['page_faults_per_timed_poll_mean']:.2f}"
    )
    for slow in r.get("slowest_timed_polls", []):
        print(
            f"    slowest of the {r['per_call_polls']} timed polls: {slow['poll_us']} us "
            f"(Python {slow['python_us']} us; largest calls {slow['calls_us']}; "
            f"{slow['page_faults']} page faults, {slow['context_switches']} context switches)"
        )
    print(f"    slow reads, per call (mean us): {r['per_call_slow_reads_us']}")
    print(f"    counter reads at open (min of 3, us): {r['counter_read_costs_at_open_us']}")
    print(f"    counter plan (after the run): {r['counter_plan']}")
    print(f"    unsupported: {r['unsupported']}  read errors: {r['read_errors']}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--polls", type=int, default=1000, help="back-to-back polls")
    ap.add_argument("--renders", type=int, default=500)
    ap.add_argument(
        "--slow-every",
        type=int,
        default=10,
        help="polls between refreshes of a slow counter (the default config: 10 s / 1 s)",
    )
    ap.add_argument("--spaced", type=int, default=160, help="spaced ticks (3 in 4 a Sentinel poll)")
    ap.add_argument("--spaced-s", type=float, default=0.5, help="seconds between them")
    ap.add_argument(
        "--load",
        default="idle",
        help="comma-separated GPU conditions to measure: idle, busy, light (default idle)",
    )
    ap.add_argument(
        "--per-call-polls", type=int, default=20, help="spaced polls timed call by call"
    )
    ap.add_argument(
        "--gc",
        default="tuned",
        choices=["tuned", "default"],
        help="this process's garbage collector: as `sentinel run` sets it (runtime.gc_*), "
        "or CPython's defaults",
    )
    ap.add_argument("--fake", action="store_true", help="use the in-memory fake NVML")
    ap.add_argument("--out", type=Path, help="write bench_gpu.json here")
    args = ap.parse_args()
    loads = [x.strip() for x in args.load.split(",") if x.strip()]
    if unknown := set(loads) - set(LOADS):
        ap.error(f"unknown --load {sorted(unknown)}: pick from {sorted(LOADS)}")
    nvml, kind = open_nvml(args.fake)
    if args.gc == "tuned":
        tune_gc(RuntimeConfig())
    gc.callbacks.append(_count_gc)
    if kind == "fake":
        loads = ["idle"]
    by_load: dict[str, list[dict[str, Any]]] = {}
    try:
        render = bench_render(nvml, args.renders)
        for load in loads:
            spec = LOADS[load]
            background = CopyLoad(*spec) if spec else None
            try:
                by_load[load] = bench_polls(
                    nvml,
                    args.polls,
                    args.slow_every,
                    args.spaced,
                    args.spaced_s,
                    args.per_call_polls,
                )
            finally:
                if background is not None:
                    background.stop()
    finally:
        nvml.close()
    for load, polls in by_load.items():
        for r in polls:
            print_polls(r, load, kind, args)
    w, wo = render["with_gpu"], render["without_gpu"]
    print(f"\n== /metrics render ({args.renders} renders, {render['gpu_series']} series)")
    print(f"{'':<14}{'p50 us':>9}{'p99 us':>9}{'bytes':>8}")
    for label in ("without_gpu", "with_gpu"):
        s = render[label]
        print(f"{label:<14}{s['p50_us']:>9}{s['p99_us']:>9}{s['bytes']:>8}")
    print(f"    with/without p50 {w['p50_us'] / wo['p50_us']:.2f}")
    print(f"    without NVML the GPU collector exposes: {render['no_gpu_exposition']}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_gpu.json").write_text(
            json.dumps({"kind": kind, "polls": by_load, "render": render}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
