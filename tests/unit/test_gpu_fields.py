"""Field values through one prepared C call (sentinel.collectors.gpu.fields): with
pynvml's internals present (the real module) the poll reuses one array of pynvml's
own structures; without them it goes through the module's wrapper. The test_gpu_nvml
module runs every device test both ways."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pynvml
import pytest

from sentinel.collectors.gpu.fake import FakeGpu, FakeHandle, FakeNvml
from sentinel.collectors.gpu.fields import FieldValues
from sentinel.collectors.gpu.nvml import load_nvml


def test_polls_reuse_one_prepared_array_and_read_the_right_values() -> None:
    gpu = FakeGpu(memory_temperature=83, ecc_corrected=5, power_mw=312_500)
    lib = FakeNvml([gpu], ctypes_fields=True)
    (device,) = load_nvml(lib).open_devices()
    lib.c_field_arrays.clear()
    samples = [device.sample() for _ in range(4)]
    assert len(lib.c_field_arrays) == 4  # one C call a poll, no wrapper call
    assert len(set(lib.c_field_arrays)) == 1  # over the same array every time
    s = samples[-1]
    assert (s.memory_temperature_c, s.ecc_corrected, s.power_w) == (83.0, 5, 312.5)
    gpu.memory_temperature, gpu.ecc_corrected = 90, 6  # values change between polls
    s = device.sample()
    assert (s.memory_temperature_c, s.ecc_corrected) == (90.0, 6)


def test_a_field_that_turns_unsupported_leaves_the_next_calls_and_is_counted_once() -> None:
    gpu = FakeGpu()
    lib = FakeNvml([gpu], ctypes_fields=True)
    (device,) = load_nvml(lib).open_devices()
    gpu.field_fail[82] = 3  # memory temperature: NotSupported from now on
    device.sample()
    gpu.field_calls.clear()
    s = device.sample()
    assert s.memory_temperature_c is None and s.unsupported_reads == {"memory_temperature": 1}
    assert all(82 not in ids for ids in gpu.field_calls)
    assert s.ecc_corrected == 0  # the other fields still read


def test_a_failing_call_raises_pynvmls_error_with_the_code() -> None:
    gpu = FakeGpu(fail={"nvmlDeviceGetFieldValues": 999})
    lib = FakeNvml([gpu], ctypes_fields=True)
    reader = FieldValues(lib, FakeHandle(0), [82, 3])
    assert reader.prepared
    with pytest.raises(pynvml.NVMLError) as err:
        reader.read()
    assert err.value.value == 999


class _WrapperOnly:
    """A pynvml-like module without pynvml's internals: only the wrapper."""

    NVMLError = pynvml.NVMLError

    def __init__(self) -> None:
        self.requests: list[Any] = []

    def nvmlDeviceGetFieldValues(self, handle: Any, requested: list[Any]) -> list[Any]:
        self.requests.append(requested)
        return [SimpleNamespace(fieldId=fid) for fid, _ in requested]


def test_without_pynvmls_internals_the_wrapper_gets_id_scope_pairs() -> None:
    lib = _WrapperOnly()
    reader = FieldValues(lib, "handle", [82, 3])
    assert not reader.prepared
    assert [v.fieldId for v in reader.read()] == [82, 3]
    assert lib.requests == [[(82, 0), (3, 0)]]  # pairs: no TypeError caught per field


def test_a_library_without_the_c_function_falls_back_to_the_wrapper() -> None:
    lib = _WrapperOnly()
    lib.c_nvmlFieldValue_t = pynvml.c_nvmlFieldValue_t  # type: ignore[attr-defined]

    def lookup(name: str) -> Any:
        raise pynvml.NVMLError(13)  # FUNCTION_NOT_FOUND: an older driver

    lib._nvmlGetFunctionPointer = lookup  # type: ignore[attr-defined]
    reader = FieldValues(lib, "handle", [82])
    assert not reader.prepared
    reader.read()
    assert lib.requests == [[(82, 0)]]
