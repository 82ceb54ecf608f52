"""nvmlDeviceGetFieldValues for one fixed set of fields, prepared once and read every poll.

pynvml's wrapper builds a new array of ``c_nvmlFieldValue_t`` on every call and sets
each field id through ``_PrintableStructure.__setattr__``, a Python method: ~18 us of
Python per 10 fields when warm, several times that in a poll that starts with cold
caches after a second asleep. With the real pynvml, ``FieldValues`` allocates the
array once (pynvml's own structure, so pynvml's layout), sets the ids once, and each
read is the one C call and pynvml's return-code check. Any other pynvml-like module
(the in-memory fake in tests) is called through its ``nvmlDeviceGetFieldValues``.

Either way a read returns the per-field results, which the caller reads with
``plain_attr`` (``object.__getattribute__``): pynvml's structures also override
``__getattribute__`` in Python, to turn bytes into str, which no number needs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

SUCCESS = 0

plain_attr: Callable[[Any, str], Any] = object.__getattribute__
plain_setattr: Callable[[Any, str, Any], None] = object.__setattr__


class FieldValues:
    """The values of ``ids`` on one device, in one ``nvmlDeviceGetFieldValues`` call."""

    def __init__(self, lib: Any, handle: Any, ids: Sequence[int]) -> None:
        self.ids = tuple(ids)
        self.prepared = False
        self._read: Callable[[], Sequence[Any]] = self._prepare(lib, handle) or (
            # (id, scope 0) pairs: given a bare id, pynvml's wrapper first tries to
            # unpack it as a pair and catches the TypeError, one exception per field
            lambda: lib.nvmlDeviceGetFieldValues(handle, [(fid, 0) for fid in self.ids])
        )

    def read(self) -> Sequence[Any]:
        """One result per id, in order (``fieldId``, ``nvmlReturn``, ``latencyUsec``,
        ``valueType``, ``value``); raises the module's ``NVMLError`` when the call
        itself fails. With the real pynvml the same array comes back each time,
        overwritten: read it before the next call."""
        return self._read()

    def _prepare(self, lib: Any, handle: Any) -> Callable[[], Sequence[Any]] | None:
        lookup = getattr(lib, "_nvmlGetFunctionPointer", None)
        struct = getattr(lib, "c_nvmlFieldValue_t", None)
        if lookup is None or struct is None or not self.ids:
            return None
        try:
            fn = lookup("nvmlDeviceGetFieldValues")
        except lib.NVMLError:
            return None  # pynvml's own call then fails the same way, and is counted
        values = (struct * len(self.ids))()
        for slot, fid in zip(values, self.ids, strict=True):
            plain_setattr(slot, "fieldId", fid)
        count, ref, error = ctypes.c_int32(len(self.ids)), ctypes.byref(values), lib.NVMLError

        def read() -> Sequence[Any]:
            ret = fn(handle, count, ref)
            if ret != SUCCESS:
                raise error(ret)
            return values

        self.prepared = True
        return read
