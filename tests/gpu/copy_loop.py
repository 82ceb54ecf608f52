"""Device-to-device copy loop for the real-GPU tests: ``python copy_loop.py SECONDS GIB``.

Allocates two buffers of GIB GiB on GPU 0, prints ``ready`` once they exist, then
copies one into the other until SECONDS have passed (torch, else cupy).
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    seconds, gib = float(sys.argv[1]), float(sys.argv[2])
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
        for _ in range(10):
            copy()
        sync()
    return 0


if __name__ == "__main__":
    sys.exit(main())
