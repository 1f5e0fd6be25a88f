"""GPU discovery against a fake NVML, the CPU fallback, masks, and the real pynvml without a driver."""

import sys
from types import SimpleNamespace

import pytest

from llama_orch.io.pool_managerd.gpu import Device, Discovery, GpuDiscovery, describe, select, vram_of

GIB = 1 << 30

MEMINFO = """\
MemTotal:       32816936 kB
MemFree:         1843212 kB
MemAvailable:   24510628 kB
Buffers:          612340 kB
Cached:         21034512 kB
SwapCached:            0 kB
Active:         12412256 kB
Inactive:       16520884 kB
HugePages_Total:       0
HugePages_Free:        0
Hugepagesize:       2048 kB
"""
MEM_TOTAL = 32816936 * 1024
MEM_AVAILABLE = 24510628 * 1024


class FakeNVMLError(Exception):
    def __init__(self, value):
        super().__init__(value)
        self.value = value

    def __str__(self):
        return {9: "Driver Not Loaded", 12: "NVML Shared Library Not Found", 3: "Not Supported",
                15: "GPU is lost"}.get(self.value, "Unknown Error")


class FakeNVML:
    """Just the pynvml surface the module uses; devices are dicts, an ``error`` key makes that handle fail."""

    NVMLError = FakeNVMLError

    def __init__(self, devices=(), *, init_error=None, driver=b"550.54.15"):
        self.devices = list(devices)
        self.init_error = init_error
        self.driver = driver
        self.init_calls = 0
        self.shutdown_calls = 0

    def nvmlInit(self):
        self.init_calls += 1
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self):
        self.shutdown_calls += 1

    def nvmlSystemGetDriverVersion(self):
        return self.driver

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index):
        if "error" in self.devices[index]:
            raise FakeNVMLError(self.devices[index]["error"])
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return self.devices[handle[1]]["name"]

    def nvmlDeviceGetUUID(self, handle):
        return self.devices[handle[1]]["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle):
        d = self.devices[handle[1]]
        return SimpleNamespace(total=d["total"], free=d["free"], used=d["total"] - d["free"])

    def nvmlDeviceGetUtilizationRates(self, handle):
        d = self.devices[handle[1]]
        if d.get("util") is None:
            raise FakeNVMLError(3)
        return SimpleNamespace(gpu=d["util"], memory=0)


H100 = {"name": "NVIDIA H100 80GB HBM3", "uuid": "GPU-aaaa-0000", "total": 80 * GIB, "free": 79 * GIB, "util": 12}
A10 = {"name": "NVIDIA A10", "uuid": "GPU-bbbb-1111", "total": 24 * GIB, "free": 20 * GIB, "util": 0}


@pytest.fixture
def meminfo(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text(MEMINFO)
    return path


def test_two_devices_with_their_figures():
    nvml = FakeNVML([H100, A10])
    d = GpuDiscovery(nvml).discover()
    assert d.nvml is True and d.error is None and d.driver_version == "550.54.15"
    assert d.devices == (
        Device(index=0, name="NVIDIA H100 80GB HBM3", uuid="GPU-aaaa-0000", vram_total_bytes=80 * GIB,
               vram_free_bytes=79 * GIB, utilization_pct=12, kind="cuda"),
        Device(index=1, name="NVIDIA A10", uuid="GPU-bbbb-1111", vram_total_bytes=24 * GIB,
               vram_free_bytes=20 * GIB, utilization_pct=0, kind="cuda"),
    )


def test_bytes_from_old_bindings_are_decoded():
    nvml = FakeNVML([dict(H100, name=b"Tesla T4", uuid=b"GPU-cccc")], driver=b"470.82.01")
    d = GpuDiscovery(nvml).discover()
    assert (d.devices[0].name, d.devices[0].uuid, d.driver_version) == ("Tesla T4", "GPU-cccc", "470.82.01")


def test_unsupported_utilisation_is_none_not_zero():
    d = GpuDiscovery(FakeNVML([dict(A10, util=None)])).discover()
    assert d.nvml is True and d.devices[0].utilization_pct is None and d.error is None


def test_a_failing_device_is_skipped_and_named():
    d = GpuDiscovery(FakeNVML([H100, dict(A10, error=15), A10])).discover()
    assert d.nvml is True
    assert [x.index for x in d.devices] == [0, 2]
    assert d.error == "device 1 skipped (NVML: GPU is lost)"
    assert describe(d).endswith("; device 1 skipped (NVML: GPU is lost)")


def test_every_device_failing_falls_back_to_the_cpu(meminfo):
    d = GpuDiscovery(FakeNVML([dict(H100, error=15)]), meminfo_path=meminfo).discover()
    assert d.nvml is False and d.devices[0].kind == "cpu"
    assert d.error == "no usable CUDA device: device 0 skipped (NVML: GPU is lost)"
    assert d.driver_version == "550.54.15"


def test_init_failure_falls_back_to_system_memory(meminfo):
    nvml = FakeNVML([H100], init_error=9)
    d = GpuDiscovery(nvml, meminfo_path=meminfo).discover()
    assert d == Discovery(
        devices=(Device(index=0, name="cpu", uuid="cpu-0", vram_total_bytes=MEM_TOTAL,
                        vram_free_bytes=MEM_AVAILABLE, utilization_pct=None, kind="cpu"),),
        driver_version=None, nvml=False, error="no NVIDIA driver (NVML: Driver Not Loaded)")
    assert describe(d) == ("no NVIDIA driver (NVML: Driver Not Loaded): 1 CPU pool device with 31.3 GiB of "
                           "system memory (23.4 GiB available)")


def test_failed_init_is_retried_and_never_shut_down(meminfo):
    nvml = FakeNVML([H100], init_error=12)
    g = GpuDiscovery(nvml, meminfo_path=meminfo)
    assert g.discover().nvml is False
    nvml.init_error = None  # the driver got loaded
    assert g.discover().nvml is True
    assert nvml.init_calls == 2
    g.close()
    assert nvml.shutdown_calls == 1


def test_missing_pynvml_falls_back(monkeypatch, meminfo):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    d = GpuDiscovery(meminfo_path=meminfo).discover()
    assert d.nvml is False and d.devices[0].vram_total_bytes == MEM_TOTAL
    assert d.error.startswith("no NVIDIA driver bindings (pynvml not importable:") and "\n" not in d.error


def test_zero_devices_falls_back(meminfo):
    nvml = FakeNVML([])
    d = GpuDiscovery(nvml, meminfo_path=meminfo).discover()
    assert d.nvml is False and d.error == "NVML found no devices" and d.driver_version == "550.54.15"
    assert d.devices[0].vram_free_bytes == MEM_AVAILABLE


def test_meminfo_without_memavailable_uses_memfree(tmp_path):
    path = tmp_path / "meminfo"
    path.write_text("MemTotal:  1000 kB\nMemFree:  400 kB\n")
    d = GpuDiscovery(FakeNVML([]), meminfo_path=path).discover()
    assert (d.devices[0].vram_total_bytes, d.devices[0].vram_free_bytes) == (1000 * 1024, 400 * 1024)


def test_unreadable_meminfo_still_gives_a_device(tmp_path):
    d = GpuDiscovery(FakeNVML([]), meminfo_path=tmp_path / "absent").discover()
    assert len(d.devices) == 1 and d.devices[0].kind == "cpu"
    assert d.error.startswith("NVML found no devices; ") and "absent" in d.error


def test_init_once_across_calls_and_shutdown_on_close():
    nvml = FakeNVML([H100])
    g = GpuDiscovery(nvml)
    first, second = g.discover(), g.discover()
    assert first == second and nvml.init_calls == 1 and nvml.shutdown_calls == 0
    g.close()
    g.close()
    assert nvml.shutdown_calls == 1
    with GpuDiscovery(nvml) as g2:
        g2.discover()
    assert (nvml.init_calls, nvml.shutdown_calls) == (2, 2)


def test_describe_cuda():
    d = GpuDiscovery(FakeNVML([H100, A10], driver="550.54")).discover()
    assert describe(d) == ("2 CUDA devices (driver 550.54): 0 NVIDIA H100 80GB HBM3 (79.0 GiB free of 80.0 GiB), "
                           "1 NVIDIA A10 (20.0 GiB free of 24.0 GiB)")
    one = GpuDiscovery(FakeNVML([A10], driver="550.54")).discover()
    assert describe(one).startswith("1 CUDA device (driver 550.54): 0 NVIDIA A10")


def test_select_by_index_uuid_and_empty_mask():
    d = GpuDiscovery(FakeNVML([H100, A10])).discover()
    assert select(d, "") == d.devices
    assert select(d, " ") == d.devices
    assert select(d, "1") == (d.devices[1],)
    assert select(d, "1,0") == (d.devices[1], d.devices[0])
    assert select(d, "GPU-aaaa-0000, 1, 0") == (d.devices[0], d.devices[1])
    with pytest.raises(ValueError) as err:
        select(d, "0,2")
    assert "'0,2'" in str(err.value) and "known indices: 0, 1" in str(err.value)
    with pytest.raises(ValueError, match="GPU-nope"):
        select(d, "GPU-nope")


def test_select_after_a_skipped_device_uses_nvml_indices():
    d = GpuDiscovery(FakeNVML([H100, dict(A10, error=15), A10])).discover()
    assert select(d, "2")[0].index == 2
    with pytest.raises(ValueError, match="known indices: 0, 2"):
        select(d, "1")


def test_select_on_cpu_discovery_is_everything(meminfo):
    d = GpuDiscovery(FakeNVML([], init_error=9), meminfo_path=meminfo).discover()
    assert select(d, "0,1") == d.devices
    assert select(d, "") == d.devices


def test_vram_of_sums():
    d = GpuDiscovery(FakeNVML([H100, A10])).discover()
    assert vram_of(d.devices) == (104 * GIB, 99 * GIB)
    assert vram_of(select(d, "1")) == (24 * GIB, 20 * GIB)
    assert vram_of(()) == (0, 0)


def test_real_pynvml_without_a_driver_falls_back(meminfo):
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this machine has a working NVIDIA driver")
    g = GpuDiscovery(meminfo_path=meminfo)
    d = g.discover()
    g.close()
    assert d.nvml is False and d.driver_version is None
    assert d.error and d.error.startswith("no NVIDIA driver (NVML: ") and "\n" not in d.error
    assert d.devices[0].kind == "cpu" and d.devices[0].vram_total_bytes == MEM_TOTAL
    assert describe(d).startswith(d.error + ": 1 CPU pool device with 31.3 GiB")
    # With the real /proc/meminfo the figures are this machine's, not zero.
    real = GpuDiscovery().discover()
    assert real.devices[0].vram_total_bytes > 0 and real.devices[0].vram_free_bytes > 0
