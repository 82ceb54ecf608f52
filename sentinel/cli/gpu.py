"""`sentinel gpu`: a table of every GPU, read from NVML directly (no Sentinel needed).

Two polls ``--interval`` apart (GPM bandwidth is measured between two samples).
Exit status: 0 with a table (or JSON); 1 when there is no GPU to show (NVML or the
driver missing, or no device), with the reason on stderr, so scripts can tell a
GPU host from a CPU one.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Annotated

import typer

from sentinel.collectors.gpu.sample import GpuSample, GpuSnapshot

_GIB = 1024**3


def read_snapshot(interval_s: float, lib: object | None = None) -> GpuSnapshot:
    """Two polls of every GPU, ``interval_s`` apart; ``available=False`` with the
    reason when there is none. ``lib`` replaces pynvml (tests)."""
    from sentinel.collectors.gpu.nvml import GpuDevice, NvmlUnavailable, load_nvml

    try:
        nvml = load_nvml(lib)
    except NvmlUnavailable as exc:
        return GpuSnapshot(available=False, reason=str(exc))
    devices: list[GpuDevice] = []
    try:
        devices = nvml.open_devices()
        if not devices:
            return GpuSnapshot(available=False, reason="NVML found no GPU")
        for d in devices:
            d.sample()
        time.sleep(interval_s)
        samples = tuple(d.sample() for d in devices)
        return GpuSnapshot(
            available=True, at=time.time(), devices=samples, driver_version=nvml.driver_version()
        )
    finally:
        for d in devices:
            d.close()
        nvml.close()


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{unit}"


def _row(d: GpuSample) -> list[str]:
    if d.lost:
        return [str(d.index), d.name, "LOST", *["-"] * 7]
    temps = f"{_fmt(d.temperature_c, '.0f')} / {_fmt(d.memory_temperature_c, '.0f')} C"
    reasons = ", ".join(d.reasons) if d.clocks_event_mask is not None else "-"
    clocks = (
        f"SM {_fmt(d.sm_clock_hz and d.sm_clock_hz / 1e6, '.0f')}"
        f"/{_fmt(d.sm_clock_max_hz and d.sm_clock_max_hz / 1e6, '.0f')} MHz\n"
        f"mem {_fmt(d.memory_clock_hz and d.memory_clock_hz / 1e6, '.0f')}"
        f"/{_fmt(d.memory_clock_max_hz and d.memory_clock_max_hz / 1e6, '.0f')} MHz"
    )
    bw = _fmt(d.memory_bandwidth_ratio and d.memory_bandwidth_ratio * 100, ".1f", "%")
    if d.memory_bandwidth_source:
        bw += f" ({d.memory_bandwidth_source})"
    sm = _fmt(d.sm_utilization_ratio and d.sm_utilization_ratio * 100, ".1f", "%")
    used = d.memory_used_bytes / _GIB if d.memory_used_bytes is not None else None
    total = d.memory_total_bytes / _GIB if d.memory_total_bytes is not None else None
    memory = f"{_fmt(used, '.1f')} / {_fmt(total, '.1f')} GiB"
    power = f"{_fmt(d.power_w, '.0f')} / {_fmt(d.power_limit_w, '.0f')} W"
    errors = [
        f"ECC {_fmt(d.ecc_corrected, 'd')}/{_fmt(d.ecc_uncorrected, 'd')}",
        f"remap {_fmt(d.remapped_correctable, 'd')}/{_fmt(d.remapped_uncorrectable, 'd')}"
        + (" PENDING" if d.remapped_pending else "")
        + (" FAILED" if d.remapped_failure else ""),
        f"replay {_fmt(d.pcie_replays, 'd')}",
    ]
    if d.xid_counts:
        errors.append("XID " + ",".join(f"{x}x{n}" for x, n in sorted(d.xid_counts.items())))
    procs = (
        "-"
        if d.processes is None
        else "\n".join(f"{p.pid} {p.used_bytes / _GIB:.1f} GiB" for p in d.processes) or "none"
    )
    return [
        str(d.index),
        d.name,
        temps,
        reasons or "none",
        f"{bw}\nSM {sm}",
        clocks,
        memory,
        power,
        "\n".join(errors),
        procs,
    ]


def render(snapshot: GpuSnapshot) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"GPUs (driver {snapshot.driver_version or '?'})", show_lines=True)
    for column in (
        "GPU",
        "Name",
        "Temp core/mem",
        "Throttle reasons",
        "Bandwidth / SM",
        "Clocks",
        "Memory",
        "Power",
        "Errors",
        "Processes",
    ):
        table.add_column(column)
    for d in snapshot.devices:
        table.add_row(*_row(d))
    Console().print(table)


def register(app: typer.Typer) -> None:
    @app.command()
    def gpu(
        as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
        interval: Annotated[
            float, typer.Option(min=0.05, max=10.0, help="Seconds between the two polls.")
        ] = 0.5,
    ) -> None:
        """Show every GPU: temperature, throttle reasons, bandwidth, memory, power, errors,
        processes. Exit 1 when there is no GPU (NVML or driver missing)."""
        snapshot = read_snapshot(interval)
        if not snapshot.available:
            typer.echo(f"sentinel gpu: no GPU to show: {snapshot.reason}", err=True)
            raise typer.Exit(1)
        if as_json:
            typer.echo(json.dumps(_jsonable(snapshot), indent=2))
        else:
            render(snapshot)


def _jsonable(snapshot: GpuSnapshot) -> dict[str, object]:
    data = asdict(snapshot)
    for dev, d in zip(data["devices"], snapshot.devices, strict=True):
        dev["reasons"] = d.reasons
        dev["read_errors"] = {f"{f}:{e}": n for (f, e), n in d.read_errors.items()}
    return data
