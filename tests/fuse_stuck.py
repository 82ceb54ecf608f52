"""A FUSE mount whose daemon reads requests and never answers them: a process that
touches a file below it waits in the kernel, and once SIGKILLed it stays in
uninterruptible sleep (state D, wait channel ``request_wait_answer``) until the
connection is aborted. The one way this test machine can make a real unkillable
process. Needs root (mount) and /dev/fuse; ``StuckFuse.available()`` says whether.
"""

from __future__ import annotations

import ctypes
import os
import struct
import threading
from pathlib import Path

MS_NOSUID, MS_NODEV = 2, 4
MNT_FORCE, MNT_DETACH = 1, 2
FUSE_INIT = 26


class StuckFuse:
    def __init__(self, mountpoint: Path) -> None:
        self.mountpoint = mountpoint
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._fd: int | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[int] = []

    @staticmethod
    def available() -> bool:
        return os.geteuid() == 0 and os.path.exists("/dev/fuse")

    def mount(self) -> StuckFuse:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        fd = os.open("/dev/fuse", os.O_RDWR)
        opts = f"fd={fd},rootmode=40000,user_id=0,group_id=0".encode()
        if (
            self._libc.mount(
                b"sentinel-stuck",
                str(self.mountpoint).encode(),
                b"fuse",
                ctypes.c_ulong(MS_NOSUID | MS_NODEV),
                opts,
            )
            != 0
        ):
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"mount fuse: {os.strerror(err)}")
        self._fd = fd
        buf = os.read(fd, 1 << 20)  # FUSE_INIT: answered, or the mount is unusable
        _, opcode, unique = struct.unpack_from("<IIQ", buf)
        assert opcode == FUSE_INIT, opcode
        readahead = struct.unpack_from("<I", buf, 48)[0]
        out = struct.pack(
            "<IIIIHHIIHHI7I", 7, 31, readahead, 0, 16, 12, 65536, 1, 0, 0, 0, *[0] * 7
        )
        os.write(fd, struct.pack("<IiQ", 16 + len(out), 0, unique) + out)
        self._thread = threading.Thread(target=self._read_forever, daemon=True)
        self._thread.start()
        return self

    def _read_forever(self) -> None:
        assert self._fd is not None
        while True:
            try:
                buf = os.read(self._fd, 1 << 20)
            except OSError:
                return  # aborted
            self.requests.append(struct.unpack_from("<I", buf, 4)[0])  # and never answered

    def release(self) -> None:
        """Abort the connection (every waiter gets an error and can die), unmount."""
        path = str(self.mountpoint).encode()
        self._libc.umount2(path, MNT_FORCE)  # aborts the connection, even if busy
        self._libc.umount2(path, MNT_DETACH)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
