"""Watchdogs benchmark against the real vLLM engine (CPU, tiny model).

Two Sentinels run side by side, one with the agent in every engine process and one
without (``watchdogs.agent.enabled: false``); rounds alternate between them so both
meet the same spells of a shared machine. Printed per engine:
  - completions per second (sequential, ``--requests`` per round) and the engine's CPU
    per request (user + system of every engine process, from /proc: the stable figure);
    the goal is under 1% apart;
  - the time one py-spy dump of each engine process takes (``POST /admin/dump``);
  - Sentinel's CPU spent in the watchdogs per minute (``sentinel_watchdog_cpu_seconds``).

Usage: .venv/bin/python -m bench.watchdogs [--rounds 4] [--requests 40] [--dumps 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from bench.common import ENGINE_ARGS, SentinelRun, engine_available, role_of

TOKEN = "bench-admin-token-0123456789abcdef"


def _engine_cpu(s: SentinelRun) -> dict[str, float]:
    """CPU seconds (user + system) of the engine's processes, by role."""
    out: dict[str, float] = {}
    for p in s.engine_tree():
        try:
            t = p.cpu_times()
            role = role_of(p)
        except psutil.Error:
            continue
        out[role] = out.get(role, 0.0) + t.user + t.system
    return out


def _round(
    s: SentinelRun, n: int, client: httpx.Client, by_role: dict[str, list[float]]
) -> tuple[float, float]:
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 16, "ignore_eos": True}
    cpu0, t0 = _engine_cpu(s), time.perf_counter()
    for _ in range(n):
        r = client.post(s.engine_url + "/v1/completions", json=body)
        r.raise_for_status()
    wall = time.perf_counter() - t0
    cpu1 = _engine_cpu(s)
    for role, v in cpu1.items():
        by_role.setdefault(role, []).append((v - cpu0.get(role, 0.0)) / n)
    return n / wall, (sum(cpu1.values()) - sum(cpu0.values())) / n


def _metric(s: SentinelRun, name: str) -> float:
    total = 0.0
    for line in s.get("/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--dumps", type=int, default=5)
    ap.add_argument(
        "--control",
        action="store_true",
        help="A/A control: the 'agent' engine runs without the agent too (measures the noise "
        "and any bias of the pair itself)",
    )
    args = ap.parse_args()
    if not engine_available():
        raise SystemExit("real vLLM or var/tiny-model missing")
    tmp = Path(tempfile.mkdtemp(prefix="bench-watchdogs-"))
    (tmp / "token").write_text(TOKEN)
    common = {
        "engine": {"args": list(ENGINE_ARGS)},
        "supervisor": {"stop_grace_s": 15.0},
        "probes": {"interval_s": 1.0, "timeout_s": 2.0, "freshness_s": 4.0},
        "ops": {"admin": {"token_file": str(tmp / "token")}},
        "proxy": {"enabled": False},
        "payload_log": {"enabled": False},
        "logging": {"engine_lines": False},
    }
    sents = {
        "agent": SentinelRun(
            tmp / "agent",
            {
                **common,
                "incidents": {"dir": str(tmp / "agent" / "inc")},
                "watchdogs": {"agent": {"enabled": not args.control}},
            },
        ),
        "no_agent": SentinelRun(
            tmp / "no_agent",
            {
                **common,
                "incidents": {"dir": str(tmp / "no_agent" / "inc")},
                "watchdogs": {"agent": {"enabled": False}},
            },
        ),
    }
    try:
        for s in sents.values():
            s.start()
        for s in sents.values():
            s.wait_serving()
        rates: dict[str, list[float]] = {k: [] for k in sents}
        cpus: dict[str, list[float]] = {k: [] for k in sents}
        roles: dict[str, dict[str, list[float]]] = {k: {} for k in sents}
        with httpx.Client(timeout=60) as client:
            for s in sents.values():  # warm-up
                _round(s, 5, client, {})
            wd0 = {k: (_metric(s, "sentinel_watchdog_cpu_seconds_total"), time.monotonic())
                   for k, s in sents.items()}  # fmt: skip
            for i in range(args.rounds):
                order = list(sents) if i % 2 == 0 else list(reversed(sents))
                for k in order:
                    rate, cpu = _round(sents[k], args.requests, client, roles[k])
                    rates[k].append(rate)
                    cpus[k].append(cpu)
            dumps: dict[str, list[float]] = {}
            s = sents["agent"]
            for _ in range(args.dumps):
                r = client.post(
                    s.ops_url + "/admin/dump", headers={"Authorization": f"Bearer {TOKEN}"}
                )
                for p in r.json()["processes"]:
                    if p["ok"]:
                        dumps.setdefault(p["role"], []).append(p["seconds"])
            wd = {}
            for k, s in sents.items():
                spent = _metric(s, "sentinel_watchdog_cpu_seconds_total") - wd0[k][0]
                wd[k] = spent / ((time.monotonic() - wd0[k][1]) / 60.0)
        out = {
            "rounds": args.rounds,
            "requests_per_round": args.requests,
            "completions_per_s_median": {
                k: round(statistics.median(v), 2) for k, v in rates.items()
            },
            "engine_cpu_ms_per_request_median": {
                k: round(statistics.median(v) * 1000, 2) for k, v in cpus.items()
            },
            "dump_seconds_median_by_role": {
                r: round(statistics.median(v), 3) for r, v in sorted(dumps.items())
            },
            "sentinel_watchdog_cpu_s_per_minute": {k: round(v, 4) for k, v in wd.items()},
        }
        out["rounds_completions_per_s"] = {k: [round(x, 2) for x in v] for k, v in rates.items()}
        out["rounds_cpu_ms_per_request"] = {
            k: [round(x * 1000, 1) for x in v] for k, v in cpus.items()
        }
        out["engine_cpu_ms_per_request_by_role_median"] = {
            k: {r: round(statistics.median(v) * 1000, 2) for r, v in sorted(d.items())}
            for k, d in roles.items()
        }
        out["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
        a, b = out["engine_cpu_ms_per_request_median"].values()
        out["cpu_per_request_ratio_agent_over_none"] = round(a / b, 4) if b else None
        ra, rb = out["completions_per_s_median"].values()
        out["throughput_ratio_agent_over_none"] = round(ra / rb, 4) if rb else None
        print(json.dumps(out, indent=2))
    finally:
        for s in sents.values():
            s.stop()


if __name__ == "__main__":
    main()
