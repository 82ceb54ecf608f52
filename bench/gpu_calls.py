"""What each NVML call costs on this GPU, idle and busy, back to back and spaced out.

    python3 -m bench.gpu_calls [--out DIR] [--quick]

The exploration behind the poll's design (issue 4's goal: a poll p99 <= 1 ms per GPU).
GPU 0 only. Phases, each with the GPU idle and under a background load
(``tests/gpu/copy_loop.py``: ``busy`` copies all the time, ``light`` ~10% duty):

- back to back: every candidate call 100 times in a row (p50/p99);
- field values: one ``nvmlDeviceGetFieldValues`` call with 1..14 fields (is the cost
  per call or per field?), and the driver's own ``latencyUsec`` of each field;
- threads: a poll's calls in one thread vs. spread over 2 and 4 (does the driver run
  them in parallel?);
- spaced: ticks ``--spacing`` apart (the production cadence is 1 s) cycling through
  * ``calls``: every candidate call once, in a random order, each timed (its position
    in the tick is kept: the first call after a sleep may pay for waking things up);
  * ``serial`` / ``thr2`` / ``thr4``: a candidate poll (cheap calls only, counters in
    one field-values call), in one thread or spread over 2 or 4;
  * ``sentinel``: ``GpuDevice.sample()`` as the code stands (then its due slow read,
    ``sentinel_slow_read``, timed on its own).
- ``spin``: the ``calls`` ticks again, idle, but busy-waiting between ticks instead of
  sleeping (is the spaced-out slowdown the CPU going to sleep, or the GPU?);
- ``gpm_streaming``: GPM samples with NVML's GPM streaming turned on (where it can be;
  restored after).

Prints per-call p50/p99 tables; ``--out`` writes ``gpu_calls.json`` (summaries and the
raw nanoseconds).

What it showed on the H100 (VM, driver 580.159.04; the poll's design follows from it):
spaced-out calls cost 5-35 us, the first of a tick ~40-100 us more (spin-waiting
instead of sleeping does not remove that); GPM's sample ~200 us spaced, idle or busy
(~40 us back to back; GPM streaming makes it worse); the process lists ~30 us idle,
~150 (compute) and ~90 (graphics) us with a process on a busy GPU; thermal violation
time (field 75 or the older call), the older power violation call, PCIe replays and
fields 270/271 are firmware round trips of 0.4-1 ms idle and 0.7-2.5 ms busy (field
74, power violation, is cheap; field 83, energy, costs 3-6 ms); a field-values call
costs ~1.5 us more per cheap field; 2 or 4 threads give no speed-up (the driver
serializes a device's calls).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import CopyLoad, pct, summarize

CHEAP_FIELDS = [82, 3, 4, 142, 143, 144, 145]  # memory temp, ECC, remapped rows
POLL_FIELDS = [*CHEAP_FIELDS, 74]  # + power violation time: Sentinel's per-poll batch
EXTRA_FIELDS = [186, 190, 269, 270, 271]  # power now, power limit, throttle-event times
FV_SCALING = {
    "fv1": [82],
    "fv2": [82, 3],
    "fv4": [82, 3, 4, 142],
    "fv7": CHEAP_FIELDS,
    "fv12": CHEAP_FIELDS + EXTRA_FIELDS,
    "fv14": CHEAP_FIELDS + EXTRA_FIELDS + [185, 83],
    "fv8_same": [82] * 8,
}


class Gpu:
    """The candidate calls on one device."""

    def __init__(self, lib: Any, index: int = 0) -> None:
        self.lib = lib
        self.h = lib.nvmlDeviceGetHandleByIndex(index)
        self.name = lib.nvmlDeviceGetName(self.h)
        self.gpm_ok = False
        try:
            self.gpm_ok = bool(lib.nvmlGpmQueryDeviceSupport(self.h).isSupportedDevice)
        except lib.NVMLError:
            pass
        if self.gpm_ok:
            self.samples = [lib.nvmlGpmSampleAlloc(), lib.nvmlGpmSampleAlloc()]
            self.cur = 0
            req = lib.c_nvmlGpmMetricsGet_t()
            req.version = lib.NVML_GPM_METRICS_GET_VERSION
            req.numMetrics = 2
            req.metrics[0].metricId, req.metrics[1].metricId = 10, 2
            self.req = req
            lib.nvmlGpmSampleGet(self.h, self.samples[1])

    def gpm_sample(self) -> None:
        self.lib.nvmlGpmSampleGet(self.h, self.samples[self.cur])

    def gpm_metrics(self) -> None:
        self.req.sample1 = self.samples[self.cur ^ 1]
        self.req.sample2 = self.samples[self.cur]
        self.cur ^= 1
        self.lib.nvmlGpmMetricsGet(self.req)

    def fv(self, ids: list[int]) -> Callable[[], Any]:
        return lambda: self.lib.nvmlDeviceGetFieldValues(self.h, ids)

    def units(self) -> dict[str, list[tuple[str, Callable[[], Any]]]]:
        """Every candidate, as units of calls made together (GPM: sample, metrics)."""
        lib, h = self.lib, self.h
        one: dict[str, Callable[[], Any]] = {
            "temperature": lambda: lib.nvmlDeviceGetTemperature(h, 0),
            "temperature_v": lambda: lib.nvmlDeviceGetTemperatureV(h, 0),
            "clocks_event_reasons": lambda: lib.nvmlDeviceGetCurrentClocksEventReasons(h),
            "clock_sm": lambda: lib.nvmlDeviceGetClockInfo(h, 1),
            "clock_mem": lambda: lib.nvmlDeviceGetClockInfo(h, 2),
            "power_usage": lambda: lib.nvmlDeviceGetPowerUsage(h),
            "power_limit": lambda: lib.nvmlDeviceGetEnforcedPowerLimit(h),
            "memory_info": lambda: lib.nvmlDeviceGetMemoryInfo(h),
            "memory_info_v2": lambda: lib.nvmlDeviceGetMemoryInfo(h, version=lib.nvmlMemory_v2),
            "utilization_rates": lambda: lib.nvmlDeviceGetUtilizationRates(h),
            "compute_procs": lambda: lib.nvmlDeviceGetComputeRunningProcesses(h),
            "graphics_procs": lambda: lib.nvmlDeviceGetGraphicsRunningProcesses(h),
            "ecc_legacy_c": lambda: lib.nvmlDeviceGetTotalEccErrors(h, 0, 0),
            "ecc_legacy_u": lambda: lib.nvmlDeviceGetTotalEccErrors(h, 1, 0),
            "remapped_legacy": lambda: lib.nvmlDeviceGetRemappedRows(h),
            "pcie_legacy": lambda: lib.nvmlDeviceGetPcieReplayCounter(h),
            "viol_thermal_legacy": lambda: lib.nvmlDeviceGetViolationStatus(h, 1),
            "viol_power_legacy": lambda: lib.nvmlDeviceGetViolationStatus(h, 0),
            "fv_memtemp_82": self.fv([82]),
            "fv_ecc_3_4": self.fv([3, 4]),
            "fv_remap_142_145": self.fv([142, 143, 144, 145]),
            "fv_pcie_94": self.fv([94]),
            "fv_viol_power_74": self.fv([74]),
            "fv_viol_thermal_75": self.fv([75]),
            "fv_throttle_269_271": self.fv([269, 270, 271]),
            "fv_power_instant_186": self.fv([186]),
            "fv_power_avg_185": self.fv([185]),
            "fv_power_limit_190": self.fv([190]),
            "fv_energy_83": self.fv([83]),
            "fv_cheap7": self.fv(CHEAP_FIELDS),
            "fv_poll8": self.fv(POLL_FIELDS),
            "fv_cheap12": self.fv(CHEAP_FIELDS + EXTRA_FIELDS),
            "fv_all15": self.fv(CHEAP_FIELDS + EXTRA_FIELDS + [94, 74, 75]),
        }
        out = {k: [(k, fn)] for k, fn in one.items()}
        if self.gpm_ok:
            out["gpm"] = [("gpm_sample", self.gpm_sample), ("gpm_metrics", self.gpm_metrics)]
        return out

    def candidate_poll(self) -> list[Callable[[], Any]]:
        """A poll of the cheap calls, counters in one field-values call (what Sentinel's
        poll reads)."""
        u = self.units()
        names = [
            "temperature",
            "clocks_event_reasons",
            "clock_sm",
            "clock_mem",
            "power_usage",
            "power_limit",
            "memory_info",
            "compute_procs",
            "fv_poll8",
        ]
        calls = [fn for n in names for _, fn in u[n]]
        if self.gpm_ok:
            calls.insert(0, lambda: (self.gpm_sample(), self.gpm_metrics()))
        return calls


def safe(lib: Any, fn: Callable[[], Any]) -> int:
    """Call ``fn``; its NVML return code (0: success; -1: not in this pynvml)."""
    try:
        fn()
        return 0
    except lib.NVMLError as exc:
        return int(exc.value)
    except AttributeError:
        return -1


def timed(lib: Any, fn: Callable[[], Any]) -> tuple[int, int]:
    t0 = time.perf_counter_ns()
    code = safe(lib, fn)
    return time.perf_counter_ns() - t0, code


def st(ns: list[int]) -> dict[str, float]:
    """The shared summary in microseconds, keys unsuffixed, with the count."""
    if not ns:
        return {}
    return {"n": len(ns), **{k.removesuffix("_us"): v for k, v in summarize(ns, "us").items()}}


def back_to_back(gpu: Gpu, reps: int) -> dict[str, Any]:
    lib = gpu.lib
    out: dict[str, Any] = {}
    for unit in gpu.units().values():
        for _ in range(5):
            for _, fn in unit:
                safe(lib, fn)
        ns: dict[str, list[int]] = defaultdict(list)
        codes: dict[str, int] = {}
        for _ in range(reps):
            for call, fn in unit:
                t, code = timed(lib, fn)
                ns[call].append(t)
                codes[call] = code
        for call, xs in ns.items():
            out[call] = {**st(xs), "code": codes[call]}
    return out


def fv_scaling(gpu: Gpu, reps: int) -> dict[str, Any]:
    lib = gpu.lib
    out: dict[str, Any] = {}
    for name, ids in FV_SCALING.items():
        fn = gpu.fv(ids)
        for _ in range(5):
            safe(lib, fn)
        out[name] = st([timed(lib, fn)[0] for _ in range(reps)])
    values = lib.nvmlDeviceGetFieldValues(gpu.h, CHEAP_FIELDS + EXTRA_FIELDS + [94, 74, 75])
    out["latency_usec_by_field"] = {
        int(v.fieldId): {"ret": int(v.nvmlReturn), "latency_us": int(v.latencyUsec)} for v in values
    }
    return out


def run_split(pool: ThreadPoolExecutor | None, groups: list[list[Callable[[], Any]]], lib: Any):
    def run(group: list[Callable[[], Any]]) -> None:
        for fn in group:
            safe(lib, fn)

    if pool is None:
        for g in groups:
            run(g)
        return
    futures = [pool.submit(run, g) for g in groups[1:]]
    run(groups[0])
    for f in futures:
        f.result()


def split(calls: list[Callable[[], Any]], n: int) -> list[list[Callable[[], Any]]]:
    return [calls[i::n] for i in range(n)]


def threads_b2b(gpu: Gpu, pools: dict[int, ThreadPoolExecutor], reps: int) -> dict[str, Any]:
    calls = gpu.candidate_poll()
    out = {}
    for n in (1, 2, 4):
        pool = pools.get(n)
        groups = split(calls, n)
        for _ in range(5):
            run_split(pool, groups, gpu.lib)
        ns = []
        for _ in range(reps):
            t0 = time.perf_counter_ns()
            run_split(pool, groups, gpu.lib)
            ns.append(time.perf_counter_ns() - t0)
        out[f"threads{n}"] = st(ns)
    return out


# ---- spaced ---------------------------------------------------------------------
def wait(seconds: float, spin: bool) -> None:
    if not spin:
        time.sleep(seconds)
        return
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def spaced(
    gpu: Gpu,
    pools: dict[int, ThreadPoolExecutor],
    ticks: int,
    spacing: float,
    kinds: tuple[str, ...],
    spin: bool = False,
) -> dict[str, Any]:
    from sentinel.collectors.gpu.nvml import GpuDevice

    lib = gpu.lib
    units = gpu.units()
    calls = gpu.candidate_poll()
    device = GpuDevice(lib, 0, slow_every=10)
    device.open()
    rng = random.Random(4)
    per_call: dict[str, list[int]] = defaultdict(list)
    first: dict[str, list[int]] = defaultdict(list)
    later: dict[str, list[int]] = defaultdict(list)
    tick_total: list[int] = []
    first_call: list[int] = []
    polls: dict[str, list[int]] = defaultdict(list)
    codes: dict[str, int] = {}
    for i in range(ticks):
        kind = kinds[i % len(kinds)]
        wait(spacing, spin)
        if kind == "calls":
            order = list(units)
            rng.shuffle(order)
            pos, total = 0, 0
            for name in order:
                for call, fn in units[name]:
                    t, code = timed(lib, fn)
                    codes[call] = code
                    per_call[call].append(t)
                    (first if pos == 0 else later)[call].append(t)
                    if pos == 0:
                        first_call.append(t)
                    pos += 1
                    total += t
            tick_total.append(total)
        elif kind == "sentinel":
            t0 = time.perf_counter_ns()
            device.sample()
            polls["sentinel"].append(time.perf_counter_ns() - t0)
            # the slow read due, as the poll thread makes it: after the poll, off its clock
            if (got := device.refresh_slow()) is not None:
                polls["sentinel_slow_read"].append(int(got[1] * 1e9))
        else:
            n = {"serial": 1, "thr2": 2, "thr4": 4}[kind]
            t0 = time.perf_counter_ns()
            run_split(pools.get(n), split(calls, n), lib)
            polls[kind].append(time.perf_counter_ns() - t0)
    device.close()
    return {
        "spacing_s": spacing,
        "spin": spin,
        "per_call": {
            c: {
                **st(xs),
                "code": codes[c],
                "p50_first": st(first[c]).get("p50"),
                "p50_later": st(later[c]).get("p50"),
            }
            for c, xs in sorted(per_call.items(), key=lambda kv: -pct(kv[1], 0.99))
        },  # fmt: skip
        "first_call_of_tick": st(first_call),
        "calls_tick_total": st(tick_total),
        "polls": {k: st(v) for k, v in polls.items()},
        "raw_ns": {"per_call": per_call, "polls": polls},
    }


def gpm_streaming(gpu: Gpu, ticks: int, spacing: float) -> dict[str, Any]:
    lib = gpu.lib
    if not gpu.gpm_ok:
        return {"skipped": "no GPM"}
    try:
        before = lib.nvmlGpmQueryIfStreamingEnabled(gpu.h)
        lib.nvmlGpmSetStreamingEnabled(gpu.h, 1)
    except (lib.NVMLError, AttributeError) as exc:
        return {"skipped": f"streaming: {exc}"}
    try:
        b2b = st([timed(lib, gpu.gpm_sample)[0] for _ in range(100)])
        ns = []
        for _ in range(ticks):
            time.sleep(spacing)
            ns.append(timed(lib, gpu.gpm_sample)[0])
            gpu.gpm_metrics()
        return {"was_enabled": before, "back_to_back": b2b, "spaced": st(ns), "raw_ns": ns}
    finally:
        try:
            lib.nvmlGpmSetStreamingEnabled(gpu.h, before)
        except lib.NVMLError:
            pass


# ---- load -------------------------------------------------------------------------
# ---- report -------------------------------------------------------------------------
def print_spaced(label: str, r: dict[str, Any]) -> None:
    print(f"\n== {label}: ticks {r['spacing_s']} s apart{' (spin-wait)' if r['spin'] else ''}")
    print(f"{'call (us)':<24}{'n':>5}{'p50':>8}{'p99':>8}{'max':>8}{'mean':>8}"
          f"{'p50@1st':>9}{'p50@2+':>8}{'rc':>4}")  # fmt: skip
    for call, s in r["per_call"].items():
        print(
            f"{call:<24}{s['n']:>5}{s['p50']:>8}{s['p99']:>8}{s['max']:>8}{s['mean']:>8}"
            f"{s['p50_first'] or '-':>9}{s['p50_later'] or '-':>8}{s['code']:>4}"
        )
    for key in ("first_call_of_tick", "calls_tick_total"):
        if r[key]:
            print(f"{key:<24}{r[key]['n']:>5}{r[key]['p50']:>8}{r[key]['p99']:>8}")
    for kind, s in r["polls"].items():
        print(f"poll {kind:<19}{s['n']:>5}{s['p50']:>8}{s['p99']:>8}{s['max']:>8}{s['mean']:>8}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--quick", action="store_true", help="a few ticks of each (a smoke test)")
    ap.add_argument("--fake", action="store_true", help="the in-memory fake NVML")
    ap.add_argument("--no-load", action="store_true", help="idle phases only")
    args = ap.parse_args()
    if args.fake:
        from sentinel.collectors.gpu.fake import FakeGpu, FakeNvml

        lib: Any = FakeNvml([FakeGpu()])
    else:
        import pynvml as lib
    lib.nvmlInit()
    gpu = Gpu(lib)
    q = args.quick
    reps = 10 if q else 100
    n_spaced, n_1s, n_light, n_spin, n_stream = (10, 3, 5, 5, 3) if q else (320, 45, 160, 60, 40)
    poll_kinds = ("calls", "serial", "thr2", "thr4", "sentinel")
    pools = {n: ThreadPoolExecutor(n - 1) for n in (2, 4)}
    result: dict[str, Any] = {"gpu": str(gpu.name), "gpm": gpu.gpm_ok, "phases": {}}
    phases = result["phases"]
    t_start = time.monotonic()

    for cond in ["idle"] + ([] if args.no_load or args.fake else ["busy"]):
        load = CopyLoad(2.0, 1.0, 600) if cond == "busy" else None
        try:
            phases[f"{cond}_b2b"] = back_to_back(gpu, reps)
            phases[f"{cond}_fv_scaling"] = fv_scaling(gpu, reps * 2)
            phases[f"{cond}_threads_b2b"] = threads_b2b(gpu, pools, reps * 2)
            phases[f"{cond}_spaced_0.25"] = spaced(gpu, pools, n_spaced, 0.25, poll_kinds)
            phases[f"{cond}_spaced_1.0"] = spaced(gpu, pools, n_1s, 1.0, ("calls", "serial"))
            if cond == "idle":
                phases["idle_spin_0.25"] = spaced(gpu, pools, n_spin, 0.25, ("calls",), spin=True)
                phases["idle_gpm_streaming"] = gpm_streaming(gpu, n_stream, 0.25)
        finally:
            if load is not None:
                load.stop()
        print(f"[{cond} done at {time.monotonic() - t_start:.0f} s]", flush=True)
    if not (args.no_load or args.fake):
        load = CopyLoad(0.5, 0.1, 600)
        try:
            phases["light_spaced_0.25"] = spaced(gpu, pools, n_light, 0.25, poll_kinds)
        finally:
            load.stop()
    for pool in pools.values():
        pool.shutdown()
    lib.nvmlShutdown()

    print(f"\nGPU 0: {result['gpu']}, GPM {result['gpm']}")
    for name, r in phases.items():
        if name.endswith("_b2b") and "threads" not in name:
            print(f"\n== {name}: each call {reps} times back to back (us)")
            print(f"{'call':<24}{'p50':>8}{'p99':>8}{'max':>8}{'rc':>4}")
            for call, s in sorted(r.items(), key=lambda kv: -kv[1]["p50"]):
                print(f"{call:<24}{s['p50']:>8}{s['p99']:>8}{s['max']:>8}{s['code']:>4}")
        elif name.endswith("fv_scaling"):
            print(f"\n== {name}: one field-values call with n fields, back to back (us)")
            for k, s in r.items():
                if k != "latency_usec_by_field":
                    print(f"  {k:<10} p50 {s['p50']:>7} p99 {s['p99']:>7}")
            print(f"  driver latencyUsec by field: {r['latency_usec_by_field']}")
        elif name.endswith("threads_b2b"):
            print(f"\n== {name}: candidate poll wall time, back to back (us)")
            for k, s in r.items():
                print(f"  {k:<10} p50 {s['p50']:>7} p99 {s['p99']:>7}")
        elif "gpm_streaming" in name:
            shown = {k: v for k, v in r.items() if k != "raw_ns"}
            print(f"\n== {name}: {shown}")
        else:
            print_spaced(name, r)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_calls.json").write_text(json.dumps(result))
    print(f"\n[total {time.monotonic() - t_start:.0f} s]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
