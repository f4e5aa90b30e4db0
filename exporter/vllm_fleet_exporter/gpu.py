"""GPU presence through NVML (pynvml from nvidia-ml-py, optional). Presence only: utilisation,
memory and health are dcgm-exporter's job."""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class GpuState:
    available: bool  # NVML imported and initialised
    count: Optional[int]
    error: str = ""


class Nvml:
    def __init__(self) -> None:
        self._nvml = None
        self._error = ""

    def _init(self) -> None:
        if self._nvml is not None:
            return
        try:
            import pynvml  # type: ignore
        except ImportError:
            self._error = "pynvml not installed"
            raise
        pynvml.nvmlInit()
        self._nvml = pynvml

    def read(self) -> GpuState:
        try:
            self._init()
        except Exception as exc:  # no module, no driver, no GPU
            return GpuState(False, None, self._error or f"{type(exc).__name__}: {exc}")
        try:
            return GpuState(True, int(self._nvml.nvmlDeviceGetCount()))
        except Exception as exc:  # driver went away (e.g. GPU fell off the bus)
            self._nvml = None
            return GpuState(True, 0, f"{type(exc).__name__}: {exc}")
