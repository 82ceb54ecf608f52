"""Device-to-device copy loop for the real-GPU tests and the GPU bench:
``python copy_loop.py SECONDS GIB [DUTY]``.

Allocates two buffers of GIB GiB on GPU 0, prints ``ready`` once they exist, then
copies one into the other until SECONDS have passed (torch, else cupy). DUTY (0..1,
default 1) is the fraction of time spent copying: below 1, each ~10 ms burst of copies
is followed by a sleep, like an engine serving light traffic.
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    seconds, gib = float(sys.argv[1]), float(sys.argv[2])
    duty = float(sys.argv[3]) if len(sys.argv) > 3 else 1.0
    n = int(gib * 1024**3) // 4
    try:
        import torch

        a = torch.empty(n, dtype=torch.float32, device="cuda").uniform_()
        b = torch.empty_like(a)
        copy, sync = (lambda: b.copy_(a)), torch.cuda.synchronize
    except ImportError:
        import cupy

        a = cupy.random.random(n, dtype=cupy.float32)
        b = cupy.empty_like(a)
        copy, sync = (lambda: b.__setitem__(slice(None), a)), cupy.cuda.Device().synchronize
    sync()
    print("ready", flush=True)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        t0 = time.monotonic()
        for _ in range(10):
            copy()
        sync()
        if duty < 1.0:
            busy = time.monotonic() - t0
            time.sleep(busy * (1.0 - duty) / max(duty, 0.01))
    return 0


if __name__ == "__main__":
    sys.exit(main())
