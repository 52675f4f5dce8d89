"""A stand-in for CuPy that runs the GPU backend's host code on the CPU.

``FakeDeviceArray`` behaves like a CuPy array in the ways that matter to the rules the
GPU path keeps: it lives on a numbered device, it refuses implicit conversion to NumPy
(``np.asarray`` raises, as CuPy does) and every explicit read of its values on the host
(``.get()``, ``float()``, ``int()``, ``bool()``, ``.item()``, ``.tolist()``) is counted
as a device-to-host transfer. ``FakeDeviceOps`` is the kernels' host code
(``roilib.cuda._host.KernelOps``) over this array type: it launches the real kernels'
CPU build, after checking that every array a launch receives is on the device that is
current, as a CUDA launch requires.
"""
from __future__ import annotations

import contextlib
import types

import numpy as np

from roilib.cuda import cpu


class Device:
    """Which fake device is current (CuPy keeps this per thread; one thread here)."""

    current = 0
    transfers = 0  # device-to-host reads of values


def _host(a):
    return a._data if isinstance(a, FakeDeviceArray) else a


class FakeDeviceArray:
    """An array on fake device ``device`` (see the module docstring)."""

    def __init__(self, data: np.ndarray, device: int):
        self._data = np.asarray(data)
        self.device = device

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed (fake device array)")

    def _read(self):
        Device.transfers += 1
        return self._data

    def get(self):
        return self._read().copy()

    def __float__(self):
        return float(self._read())

    def __int__(self):
        return int(self._read())

    def __bool__(self):
        return bool(self._read())

    def __index__(self):
        return int(self._read())

    def item(self):
        return self._read().item()

    def tolist(self):
        return self._read().tolist()

    def __len__(self):
        return len(self._data)

    def __mul__(self, other):
        return FakeDeviceArray(self._data * _host(other), self.device)

    def astype(self, dtype, copy=True):
        return FakeDeviceArray(self._data.astype(dtype, copy=copy), self.device)

    def fill(self, value):
        self._data.fill(value)

    def __getitem__(self, key):
        return FakeDeviceArray(self._data[key], self.device)

    def __setitem__(self, key, value):
        if isinstance(value, FakeDeviceArray) and value.device != self.device:
            raise ValueError("copy between fake devices")
        self._data[key] = _host(value)


def _here(data):
    return FakeDeviceArray(data, Device.current)


xp = types.SimpleNamespace(
    __name__="fakedevice",
    ndarray=FakeDeviceArray,
    empty=lambda shape, dtype=np.float64: _here(np.empty(shape, dtype)),
    zeros=lambda shape, dtype=np.float64: _here(np.zeros(shape, dtype)),
    full=lambda shape, value, dtype=None: _here(np.full(shape, value, dtype)),
    asarray=lambda a, dtype=None: a if isinstance(a, FakeDeviceArray) else _here(np.asarray(a, dtype)),
    ascontiguousarray=lambda a: FakeDeviceArray(np.ascontiguousarray(a._data), a.device),
    concatenate=lambda arrays, axis=0: _here(np.concatenate([_host(a) for a in arrays], axis=axis)),
    stack=lambda arrays, axis=0: _here(np.stack([_host(a) for a in arrays], axis=axis)),
    cos=lambda a: FakeDeviceArray(np.cos(a._data), a.device),
    sin=lambda a: FakeDeviceArray(np.sin(a._data), a.device),
)


def _cumsum(a, axis=None, dtype=None, out=None):
    result = np.cumsum(a._data, axis=axis, dtype=dtype)
    if out is None:
        return _here(result)
    out._data[...] = result
    return out


xp.cumsum = _cumsum
FakeDeviceArray.__roilib_xp__ = xp


def to_device(a, device: int = 0) -> FakeDeviceArray:
    """Host-to-device copy (allowed, and not counted)."""
    return FakeDeviceArray(np.array(a), device)


class FakeDeviceOps(cpu.CpuOps):
    """The host code of ``roilib.cuda.gpu`` over fake device arrays, kernels from the CPU build."""

    xp = xp
    tile = 8  # as on a GPU

    def __init__(self, scope: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.scope = scope
        self.launched_on = []

    def device_scope(self, array):
        if not self.scope:
            return contextlib.nullcontext()
        return self._use(array.device)

    @contextlib.contextmanager
    def _use(self, device):
        previous, Device.current = Device.current, device
        try:
            yield
        finally:
            Device.current = previous

    def launch(self, family, kernel, dtype, n, *args):
        for a in args:
            if isinstance(a, FakeDeviceArray):
                assert a.device == Device.current, (
                    f"{family}_{kernel}: an array on device {a.device} launched on device {Device.current}"
                )
            else:
                assert not isinstance(a, np.ndarray), f"{family}_{kernel}: a host array reached a device launch"
        self.launched_on.append(Device.current)
        super().launch(family, kernel, dtype, n, *[_host(a) for a in args])
