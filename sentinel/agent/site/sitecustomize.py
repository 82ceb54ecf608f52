"""Sentinel's agent, loaded into every Python process of the engine (issue 17).

Sentinel puts this directory first on the engine's ``PYTHONPATH``; Python imports
``sitecustomize`` at start-up, so every interpreter of the engine (the API server,
and EngineCore and Workers, forked or spawned) runs this file. It then imports the
``sitecustomize`` that would have run without it, so nothing of the host's is lost.

What it does (standard library only; nothing here may ever stop the engine):
- records each garbage-collector pause with its generation (``gc.callbacks``);
- applies GC settings Sentinel passes (thresholds; ``gc.freeze()`` after a delay);
- sends them every ``SENTINEL_AGENT_INTERVAL`` seconds as one JSON datagram to the
  unix socket named by ``SENTINEL_AGENT_SOCKET`` (no network port);
- any exception inside the agent disables it for the process and is reported once
  (to Sentinel, and on stderr).

A test-only hook is compiled in but inert unless ``SENTINEL_AGENT_TEST_CONTROL``
names a JSON file: a test writes actions there (spin in a named function, grow
memory at a rate, provoke long GC pauses) for the processes of a given role.
"""


def _sentinel_agent_main():  # a function: nothing leaks into the sitecustomize namespace
    import os

    sock_path = os.environ.get("SENTINEL_AGENT_SOCKET")
    if not sock_path:
        return
    import array
    import gc
    import json
    import socket
    import sys
    import threading
    import time

    interval = float(os.environ.get("SENTINEL_AGENT_INTERVAL", "1.0") or 1.0)
    tracked_every = float(os.environ.get("SENTINEL_AGENT_TRACKED_EVERY_S", "600") or 0)
    max_pauses = 2000
    state = {
        "pid": os.getpid(),
        "dropped": 0,
        "disabled": None,
        "reported": False,
        "sock": None,
        "seq": 0,
        "started": time.monotonic(),
        "frozen": False,
        "tracked": None,
        "frozen_count": None,
        "tracked_at": time.monotonic(),
        "thread": None,
        "test_done": set(),
        "test_mtime": None,
        "hold": [],
    }
    perf = time.perf_counter

    def send(msg):
        sock = state["sock"]
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            state["sock"] = sock
        try:
            sock.sendto(json.dumps(msg, separators=(",", ":")).encode(), sock_path)
            return True
        except OSError:  # Sentinel gone, or its queue full: this report is lost
            return False

    def disable(where, exc):
        if state["disabled"] is not None:
            return
        state["disabled"] = f"{where}: {type(exc).__name__}: {exc}"[:500]
        try:
            gc.callbacks.remove(on_gc)
        except ValueError:
            pass
        # on file descriptor 2, never through sys.stderr: this runs inside a GC callback,
        # in any thread, and sys.stderr's lock may be held for good (a process forked
        # while another thread was writing inherits it held: its first write would hang)
        try:
            msg = f"sentinel agent disabled in pid {os.getpid()}: {state['disabled']}\n"
            os.write(2, msg.encode("utf-8", "replace"))
        except Exception:  # noqa: BLE001
            pass
        try:
            send({"t": "disabled", "pid": os.getpid(), "error": state["disabled"]})
        except Exception:  # noqa: BLE001
            pass

    fail = os.environ.get("SENTINEL_AGENT_TEST_FAIL", "") if test_hooks_on() else ""

    # pauses go into arrays of machine numbers: appending creates no object the collector
    # tracks (a tuple per pause measurably slowed allocation-heavy code)
    def new_buffers():
        return (array.array("d"), array.array("b"), array.array("q"))

    bufs = new_buffers()
    t0 = 0.0

    def on_gc(phase, info):
        nonlocal t0
        try:
            if fail == "callback":
                raise RuntimeError("failing on purpose (SENTINEL_AGENT_TEST_FAIL=callback)")
            if phase == "start":
                t0 = perf()
                return
            if not t0:
                return
            seconds, t0 = perf() - t0, 0.0
            durations, generations, collected = bufs
            if len(durations) < max_pauses:
                durations.append(seconds)
                generations.append(info["generation"])
                collected.append(info["collected"])
            else:
                state["dropped"] += 1
        except Exception as exc:  # noqa: BLE001
            disable("gc callback", exc)

    def take_pauses():
        nonlocal bufs
        (durations, generations, collected), bufs = bufs, new_buffers()
        return [list(x) for x in zip(generations, durations, collected, strict=False)]

    def role_hint():
        try:
            with open("/proc/self/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ")
        except OSError:
            return "unknown"
        if b"EngineCore" in cmd:
            return "engine_core"
        if b"Worker" in cmd:
            return "worker"
        return "api_server" if os.getpid() == root_pid else "other"

    def report():
        pauses = take_pauses()
        dropped, state["dropped"] = state["dropped"], 0
        now = time.monotonic()
        if tracked_every > 0 and now - state["tracked_at"] >= tracked_every:
            # both walk every object of the process (tens of ms per million, GIL held):
            # rare on purpose (SENTINEL_AGENT_TRACKED_EVERY_S)
            state["tracked_at"] = now
            state["tracked"] = len(gc.get_objects())
            state["frozen_count"] = gc.get_freeze_count()
        state["seq"] += 1
        send(
            {
                "t": "report",
                "pid": os.getpid(),
                "seq": state["seq"],
                "pauses": pauses,
                "dropped": dropped,
                "count": gc.get_count(),
                "threshold": gc.get_threshold(),
                "frozen": state["frozen_count"],
                "tracked": state["tracked"],
                "hint": role_hint(),
            }
        )

    def apply_settings():
        raw = os.environ.get("SENTINEL_AGENT_GC_THRESHOLDS", "")
        if raw:
            gc.set_threshold(*[int(x) for x in raw.split(",")])

    def maybe_freeze():
        raw = os.environ.get("SENTINEL_AGENT_GC_FREEZE_AFTER_S", "")
        if raw and not state["frozen"] and time.monotonic() - state["started"] >= float(raw):
            state["frozen"] = True
            gc.freeze()

    def loop():
        while state["disabled"] is None:
            time.sleep(interval)
            if state["pid"] != os.getpid():
                return  # a forked copy of this thread cannot exist; belt and braces
            try:
                maybe_freeze()
                if test_hooks_on():
                    run_test_actions()
                report()
            except Exception as exc:  # noqa: BLE001
                disable("reporter", exc)

    def start_thread():
        t = threading.Thread(target=loop, name="sentinel-agent", daemon=True)
        state["thread"] = t
        t.start()

    def after_fork():
        try:
            state["pid"] = os.getpid()
            take_pauses()
            state["dropped"] = 0
            state["sock"] = None  # the parent's socket object is shared; use our own
            state["started"] = time.monotonic()
            state["test_done"] = set(state["test_done"])
            state["hold"] = []
            state["tracked_at"] = time.monotonic()
            if state["disabled"] is None:
                start_thread()
                send({"t": "hello", "pid": os.getpid(), "ppid": os.getppid(), "fork": True})
        except Exception as exc:  # noqa: BLE001
            disable("after fork", exc)

    # ---- test-only hook (inert unless SENTINEL_AGENT_TEST_CONTROL is set) ----
    def run_test_actions():
        path = os.environ.get("SENTINEL_AGENT_TEST_CONTROL", "")
        try:
            mtime = os.stat(path).st_mtime_ns
        except OSError:
            return
        if mtime == state["test_mtime"]:
            return
        state["test_mtime"] = mtime
        with open(path) as f:
            actions = json.load(f).get("actions", [])
        me = role_hint()
        for act in actions:
            key = act.get("id")
            if key in state["test_done"] or act.get("role") not in (me, "any"):
                continue
            # an action names the engine generation it is for (its API server's pid): a
            # later generation, reading the same file, does not replay it at its start-up
            if act.get("root") not in (None, root_pid):
                continue
            state["test_done"].add(key)
            threading.Thread(target=test_action, args=(act,), daemon=True).start()

    def test_action(act):
        kind = act.get("do")
        if kind == "spin":
            name = str(act.get("function", "sentinel_test_spin"))

            def spin(seconds):
                end = time.monotonic() + seconds
                x = 0
                while time.monotonic() < end:
                    x += 1

            named = type(spin)(
                spin.__code__.replace(co_name=name, co_qualname=name),
                spin.__globals__,
                name,
                None,
                spin.__closure__,
            )
            named(float(act.get("seconds", 600)))
        elif kind == "grow":
            rate = float(act["bytes_per_s"])
            seconds = float(act.get("seconds", 3600))
            step = 0.1
            end = time.monotonic() + seconds
            next_t = time.monotonic()
            while time.monotonic() < end:
                chunk = bytearray(b"\x01") * int(rate * step)  # written: resident at once
                state["hold"].append(chunk)
                next_t += step
                time.sleep(max(0.0, next_t - time.monotonic()))
        elif kind == "gc_pause":
            junk = [[i] for i in range(int(act.get("objects", 2_000_000)))]
            for _ in range(int(act.get("count", 3))):
                gc.collect()
                time.sleep(float(act.get("every_s", 0.5)))
            del junk

    root_pid = int(os.environ.get("SENTINEL_AGENT_ROOT_PID", "0") or 0)
    if not root_pid:
        root_pid = os.getpid()
        os.environ["SENTINEL_AGENT_ROOT_PID"] = str(root_pid)
    try:
        if fail == "import":
            raise RuntimeError("failing on purpose (SENTINEL_AGENT_TEST_FAIL=import)")
        apply_settings()
        gc.callbacks.append(on_gc)
        os.register_at_fork(after_in_child=after_fork)
        start_thread()
        send(
            {
                "t": "hello",
                "pid": os.getpid(),
                "ppid": os.getppid(),
                "python": sys.version.split()[0],
                "fork": False,
            }
        )
    except Exception as exc:  # noqa: BLE001
        disable("start-up", exc)


def test_hooks_on():
    import os

    return bool(os.environ.get("SENTINEL_AGENT_TEST_CONTROL"))


def _sentinel_chain():
    """Run the sitecustomize this one shadows (the next one on sys.path), if any."""
    import importlib.machinery
    import importlib.util
    import os
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


try:
    _sentinel_agent_main()
except Exception as _exc:  # noqa: BLE001
    import sys as _sys

    _sys.stderr.write(f"sentinel agent disabled: {type(_exc).__name__}: {_exc}\n")
try:
    _sentinel_chain()
except Exception as _exc:  # noqa: BLE001
    import sys as _sys

    _sys.stderr.write(f"sentinel agent: the original sitecustomize failed: {_exc}\n")
