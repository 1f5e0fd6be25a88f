"""GPU discovery: which devices this machine has, how much memory they hold, and which a mask names.

Owns the only conversation with NVML (``pynvml``). ``GpuDiscovery.discover()`` returns a
``Discovery`` snapshot: one ``Device`` per NVIDIA GPU, or, where there is no usable driver (no
``pynvml``, NVML failing to initialise, no devices), a single CPU device sized from
``/proc/meminfo`` together with a one-line reason. Discovery never logs and never raises for a
missing driver: the caller decides how loudly to say so, and ``describe()`` gives it the line.
``select()`` resolves a ``CUDA_VISIBLE_DEVICES``-style mask against a snapshot and ``vram_of()``
sums the memory of a selection; ``pool_devices()`` maps the pools' masks to their devices (and the
devices no pool uses) for the per-device metrics, whose ``device`` label ``device_label()`` gives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Iterable, Mapping

DEFAULT_MEMINFO = "/proc/meminfo"
_GIB = 1 << 30


@dataclass(frozen=True, slots=True, kw_only=True)
class Device:
    index: int
    name: str
    uuid: str
    vram_total_bytes: int
    vram_free_bytes: int
    utilization_pct: int | None
    kind: str  # "cuda" or "cpu"


@dataclass(frozen=True, slots=True, kw_only=True)
class Discovery:
    devices: tuple[Device, ...]
    driver_version: str | None
    nvml: bool  # False when NVML was unavailable and the CPU fallback was used
    error: str | None  # one line: why NVML was unavailable, or which devices were skipped


class GpuDiscovery:
    """Discovers devices through NVML, keeping NVML initialised between calls until ``close()``."""

    def __init__(self, nvml: ModuleType | Any | None = None, meminfo_path: str | os.PathLike[str] = DEFAULT_MEMINFO) -> None:
        self._nvml = nvml
        self._meminfo_path = Path(meminfo_path)
        self._initialised = False

    def discover(self) -> Discovery:
        nvml, reason = self._load()
        if nvml is None:
            return self._cpu_fallback(reason, driver_version=None)
        # A failed init is not remembered: a driver loaded after start-up is picked up next call.
        if not self._initialised:
            try:
                nvml.nvmlInit()
            except nvml.NVMLError as e:
                return self._cpu_fallback(f"no NVIDIA driver (NVML: {_one_line(e)})", driver_version=None)
            self._initialised = True

        try:
            driver: str | None = _text(nvml.nvmlSystemGetDriverVersion())
        except nvml.NVMLError:
            # The version is informational; not knowing it is no reason to lose the devices.
            driver = None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except nvml.NVMLError as e:
            return self._cpu_fallback(f"NVML could not count devices ({_one_line(e)})", driver_version=driver)

        devices: list[Device] = []
        skipped: list[str] = []
        for index in range(count):
            try:
                devices.append(_read_device(nvml, index))
            except nvml.NVMLError as e:
                # One sick GPU (fallen off the bus, ECC lockout) must not hide the healthy ones.
                skipped.append(f"device {index} skipped (NVML: {_one_line(e)})")
        if not devices:
            reason = "NVML found no devices" if not skipped else "no usable CUDA device: " + "; ".join(skipped)
            return self._cpu_fallback(reason, driver_version=driver)
        return Discovery(devices=tuple(devices), driver_version=driver, nvml=True,
                         error="; ".join(skipped) or None)

    def close(self) -> None:
        if not self._initialised:
            return
        self._initialised = False
        try:
            self._nvml.nvmlShutdown()
        except self._nvml.NVMLError:
            pass  # shutting down on the way out; nothing useful to do with a failure

    def __enter__(self) -> GpuDiscovery:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self) -> tuple[Any | None, str]:
        if self._nvml is not None:
            return self._nvml, ""
        # Imported lazily so that merely importing this module never touches the driver.
        try:
            import pynvml
        except ImportError as e:
            return None, f"no NVIDIA driver bindings (pynvml not importable: {_one_line(e)})"
        self._nvml = pynvml
        return pynvml, ""

    def _cpu_fallback(self, reason: str, *, driver_version: str | None) -> Discovery:
        total, available, note = _system_memory(self._meminfo_path)
        cpu = Device(index=0, name="cpu", uuid="cpu-0", vram_total_bytes=total, vram_free_bytes=available,
                     utilization_pct=None, kind="cpu")
        error = reason if not note else f"{reason}; {note}"
        return Discovery(devices=(cpu,), driver_version=driver_version, nvml=False, error=error)


def _read_device(nvml: Any, index: int) -> Device:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:
        # Not supported on some boards (and under MIG); absent, not zero.
        utilization = None
    return Device(index=index, name=_text(nvml.nvmlDeviceGetName(handle)), uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
                  vram_total_bytes=int(memory.total), vram_free_bytes=int(memory.free),
                  utilization_pct=utilization, kind="cuda")


def _system_memory(meminfo_path: Path) -> tuple[int, int, str]:
    """(total, available, note) in bytes; the note says why the figures are approximate or zero."""
    fields: dict[str, int] = {}
    try:
        for line in meminfo_path.read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                fields[key.strip()] = int(parts[0]) * 1024  # /proc/meminfo says "kB" and means KiB
    except OSError as e:
        fields = {}
        note = f"{meminfo_path} unreadable ({e.strerror or e})"
    else:
        note = ""
    if "MemTotal" in fields:
        # MemFree undercounts what can be had (page cache is reclaimable); MemAvailable is the
        # kernel's own estimate, missing only before Linux 3.14.
        available = fields.get("MemAvailable", fields.get("MemFree", 0))
        return fields["MemTotal"], available, note
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page, note
    except (ValueError, OSError, AttributeError):
        return 0, 0, note or f"no MemTotal in {meminfo_path}"


def _text(value: str | bytes) -> str:
    # pynvml before 11.5 returns bytes for names, UUIDs and versions.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def describe(discovery: Discovery) -> str:
    """One human line for a log: what was found, and why it is the CPU when it is."""
    if not discovery.nvml:
        memory = vram_of(discovery.devices)
        line = (f"1 CPU pool device with {_gib(memory[0])} of system memory ({_gib(memory[1])} available)"
                if len(discovery.devices) == 1 else f"{len(discovery.devices)} CPU pool devices")
        return f"{discovery.error or 'NVML unavailable'}: {line}"
    n = len(discovery.devices)
    head = f"{n} CUDA device{'s' if n != 1 else ''}"
    if discovery.driver_version:
        head += f" (driver {discovery.driver_version})"
    body = ", ".join(f"{d.index} {d.name} ({_gib(d.vram_free_bytes)} free of {_gib(d.vram_total_bytes)})"
                     for d in discovery.devices)
    line = f"{head}: {body}"
    return f"{line}; {discovery.error}" if discovery.error else line


def _gib(n: int) -> str:
    return f"{n / _GIB:.1f} GiB"


def select(discovery: Discovery, device_mask: str) -> tuple[Device, ...]:
    """The devices a ``CUDA_VISIBLE_DEVICES``-style mask names, in the mask's order.

    Entries are NVML indices or UUIDs. NVML numbers devices in PCI bus order, as CUDA does only
    with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``; whoever launches an engine with this mask should set it.
    An empty mask, or a CPU-only discovery (there is nothing to mask), means every device.
    """
    entries = [e.strip() for e in device_mask.split(",") if e.strip()]
    if not entries or all(d.kind == "cpu" for d in discovery.devices):
        return discovery.devices
    by_index = {str(d.index): d for d in discovery.devices}
    by_uuid = {d.uuid: d for d in discovery.devices}
    chosen: list[Device] = []
    for entry in entries:
        device = by_index.get(entry) or by_uuid.get(entry)
        if device is None:
            known = ", ".join(by_index) or "none"
            raise ValueError(f"device mask {device_mask!r} names {entry!r}, which is not a discovered device "
                             f"(known indices: {known})")
        if device not in chosen:
            chosen.append(device)
    return tuple(chosen)


def device_label(device: Device) -> str:
    """A device as a metric label: its NVML index, or ``cpu`` for the system-memory fallback."""
    return "cpu" if device.kind == "cpu" else str(device.index)


def pool_devices(discovery: Discovery, masks: Mapping[str, str]) -> tuple[dict[str, tuple[Device, ...]],
                                                                         tuple[Device, ...]]:
    """Each pool's devices (``masks``: pool id -> its device mask; a mask naming a device that was
    not discovered gives none) and, apart, the devices no pool uses, in index order."""
    per_pool: dict[str, tuple[Device, ...]] = {}
    used: set[int] = set()
    for pool_id, mask in masks.items():
        try:
            chosen = select(discovery, mask)
        except ValueError:
            chosen = ()
        per_pool[pool_id] = chosen
        used.update(d.index for d in chosen)
    return per_pool, tuple(d for d in discovery.devices if d.index not in used)


def vram_of(devices: Iterable[Device]) -> tuple[int, int]:
    """(total, free) bytes summed over ``devices``."""
    total = free = 0
    for d in devices:
        total += d.vram_total_bytes
        free += d.vram_free_bytes
    return total, free
