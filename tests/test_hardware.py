"""GPU sizes, presets, usable memory and the NVML probe (pynvml monkeypatched: no GPU here)."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pynvml
import pytest
from click.testing import CliRunner

from lowmem_tune import hardware
from lowmem_tune.cli import main
from lowmem_tune.errors import UserError
from lowmem_tune.hardware import GiB, MiB, PRESETS, parse_size, resolve_gpu, usable_bytes


@pytest.mark.parametrize("text, expected", [
    ("24GB", 24 * 1000**3), ("24GiB", 24 * GiB), ("16000MiB", 16000 * MiB), ("1.5 GiB", int(1.5 * GiB)),
    ("512mb", 512 * 1000**2),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["24", "GiB", "24 GX", "-3GiB", "24GiBs", "0GiB"])
def test_parse_size_rejects_malformed(text):
    with pytest.raises(UserError):
        parse_size(text)


def test_presets_cover_the_issue_and_flag_bf16():
    for name in ("rtx4090", "rtx3090", "rtx4080", "rtx4070ti-super", "rtx4060ti-16gb", "rtx3060", "t4", "a10",
                 "l4", "a100-40gb", "a100-80gb", "h100-80gb"):
        assert name in PRESETS
    assert resolve_gpu("rtx4090") == hardware.GpuTarget("rtx4090", 24 * GiB, True, "preset")
    assert resolve_gpu("T4").bf16 is False  # Turing: compute capability 7.5
    assert resolve_gpu("24GiB").source == "size"


def test_usable_memory_subtracts_reserve_and_margin():
    total = 24 * GiB
    assert usable_bytes(total, 0.0) == total - hardware.reserve_bytes(total)
    assert usable_bytes(total, 0.1) == int(total - hardware.reserve_bytes(total) - 0.1 * total)
    assert usable_bytes(total, 0.1, used_by_others=GiB) == usable_bytes(total, 0.1) - GiB


def test_unknown_gpu_name_suggests_presets():
    with pytest.raises(UserError, match="rtx4090"):
        resolve_gpu("rtx4909")


class _FakeNvml:
    """Two GPUs; the second does not report power or temperature."""

    def __init__(self, monkeypatch):
        self.shutdowns = 0
        gpus = [("NVIDIA GeForce RTX 4090", "GPU-aaaa", (8, 9)), ("Tesla T4", "GPU-bbbb", (7, 5))]
        monkeypatch.setattr(pynvml, "nvmlInit", lambda: None)
        monkeypatch.setattr(pynvml, "nvmlShutdown", self._shutdown)
        monkeypatch.setattr(pynvml, "nvmlSystemGetDriverVersion", lambda: "550.54")
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCount", lambda: len(gpus))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetHandleByIndex", lambda i: i)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetName", lambda h: gpus[h][0].encode())
        monkeypatch.setattr(pynvml, "nvmlDeviceGetUUID", lambda h: gpus[h][1])
        monkeypatch.setattr(pynvml, "nvmlDeviceGetCudaComputeCapability", lambda h: gpus[h][2])
        monkeypatch.setattr(pynvml, "nvmlDeviceGetMemoryInfo", self._memory)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetUtilizationRates", lambda h: SimpleNamespace(gpu=37))
        monkeypatch.setattr(pynvml, "nvmlDeviceGetTemperature", self._temperature)
        monkeypatch.setattr(pynvml, "nvmlDeviceGetPowerUsage", self._power)

    def _shutdown(self):
        self.shutdowns += 1

    @staticmethod
    def _memory(handle, version=None):
        reserved = 300 * MiB
        used = reserved + 700 * MiB
        return SimpleNamespace(total=24 * GiB, free=24 * GiB - used, used=used, reserved=reserved)

    @staticmethod
    def _temperature(handle, sensor):
        if handle == 1:
            raise pynvml.NVMLError_NotSupported()
        return 51

    @staticmethod
    def _power(handle):
        if handle == 1:
            raise pynvml.NVMLError_NoPermission()
        return 212_500


def test_probe_reads_every_field_and_marks_unsupported_as_none(monkeypatch):
    fake = _FakeNvml(monkeypatch)
    first, second = hardware.probe_gpus()
    assert (first.name, first.uuid, first.compute_capability, first.bf16) == ("NVIDIA GeForce RTX 4090", "GPU-aaaa", (8, 9), True)
    assert (first.temperature_c, first.power_w, first.utilization_percent) == (51, 212.5, 37)
    assert first.reserved_bytes == 300 * MiB and first.driver_version == "550.54"
    assert second.bf16 is False and second.temperature_c is None and second.power_w is None
    assert fake.shutdowns == 1


def test_gpu_auto_uses_the_probe_and_counts_other_processes(monkeypatch):
    _FakeNvml(monkeypatch)
    target = resolve_gpu("auto", gpu_index=1)
    assert (target.name, target.source, target.bf16) == ("Tesla T4", "probe", False)
    assert target.used_by_others_bytes == 700 * MiB  # used minus the driver reserve
    with pytest.raises(UserError, match="--gpu-index 5"):
        resolve_gpu("auto", gpu_index=5)


def test_read_gpu_stats_and_uuid_matching(monkeypatch):
    _FakeNvml(monkeypatch)
    stats = hardware.read_gpu_stats(0)
    assert (stats.used_bytes, stats.total_bytes, stats.utilization_percent) == (1000 * MiB, 24 * GiB, 37)
    assert hardware.read_gpu_stats(1).power_w is None
    assert hardware.nvml_index_of_uuid("bbbb") == 1  # torch reports UUIDs without NVML's "GPU-"
    assert hardware.nvml_index_of_uuid("GPU-AAAA") == 0
    assert hardware.nvml_index_of_uuid("cccc") is None


def _no_driver(monkeypatch):
    def fail():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(pynvml, "nvmlInit", fail)


def test_probe_without_driver(monkeypatch):
    _no_driver(monkeypatch)
    assert hardware.probe_gpus() == []
    assert hardware.read_gpu_stats(0) is None
    result = CliRunner().invoke(main, ["probe"])
    assert result.exit_code == 0 and "no NVIDIA GPU found" in result.output
    result = CliRunner().invoke(main, ["probe", "--json"])
    assert json.loads(result.output) == {"gpus": []}


def test_probe_json_lists_gpus(monkeypatch):
    _FakeNvml(monkeypatch)
    result = CliRunner().invoke(main, ["probe", "--json"])
    gpus = json.loads(result.output)["gpus"]
    assert [g["uuid"] for g in gpus] == ["GPU-aaaa", "GPU-bbbb"] and gpus[1]["power_w"] is None


class _FakeCudaRuntime:
    """torch.cuda as CUDA numbers devices: only those CUDA_VISIBLE_DEVICES lists (by physical index or
    UUID), in that order. The physical order here is NVML's, as on a machine with one PCI root."""

    uuids = ["aaaa", "bbbb"]  # torch reports UUIDs without NVML's "GPU-"

    def visible(self) -> list[str]:
        listed = os.environ.get("CUDA_VISIBLE_DEVICES")
        if listed is None:
            return list(self.uuids)
        picked = []
        for item in listed.split(","):
            item = item.strip().lower()
            picked.append(self.uuids[int(item)] if item.isdigit() else item.removeprefix("gpu-"))
        return picked

    def get_device_properties(self, index: int) -> SimpleNamespace:
        return SimpleNamespace(uuid=self.visible()[index])


@pytest.mark.parametrize("visible, expected", [(None, 0), ("1", 1), ("1,0", 1), ("GPU-bbbb", 1), ("0", 0)])
def test_the_nvml_index_of_torch_device_0_follows_cuda_visible_devices(monkeypatch, visible, expected):
    import torch

    _FakeNvml(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", _FakeCudaRuntime().get_device_properties)
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert hardware.nvml_index_of_torch_device(0) == expected


def test_the_nvml_index_is_none_when_nvml_does_not_list_the_gpu(monkeypatch):
    import torch

    _no_driver(monkeypatch)
    monkeypatch.setattr(torch.cuda, "get_device_properties", _FakeCudaRuntime().get_device_properties)
    assert hardware.nvml_index_of_torch_device(0) is None
