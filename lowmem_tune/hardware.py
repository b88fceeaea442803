"""GPUs: discovery through NVML (pynvml), presets, sizes, and the memory a plan may use.

NVML needs no CUDA context, so `probe` and `plan --gpu auto` never start one and never import
torch. NVML orders GPUs by PCI bus and ignores CUDA_VISIBLE_DEVICES, so a torch device is matched
to its NVML twin by UUID (`nvml_index_of_torch_device`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lowmem_tune.errors import UserError

GiB = 1024**3
MiB = 1024**2


# --------------------------------------------------------------------------- presets and sizes


@dataclass(frozen=True)
class GpuPreset:
    total_bytes: int
    compute_capability: tuple[int, int]

    @property
    def bf16(self) -> bool:
        return self.compute_capability >= (8, 0)


PRESETS: dict[str, GpuPreset] = {
    "rtx4090": GpuPreset(24 * GiB, (8, 9)),
    "rtx4080": GpuPreset(16 * GiB, (8, 9)),
    "rtx4070ti-super": GpuPreset(16 * GiB, (8, 9)),
    "rtx4060ti-16gb": GpuPreset(16 * GiB, (8, 9)),
    "rtx3090": GpuPreset(24 * GiB, (8, 6)),
    "rtx3080": GpuPreset(10 * GiB, (8, 6)),
    "rtx3060": GpuPreset(12 * GiB, (8, 6)),
    "rtx4060": GpuPreset(8 * GiB, (8, 9)),
    "rtx3070": GpuPreset(8 * GiB, (8, 6)),
    "rtx2080ti": GpuPreset(11 * GiB, (7, 5)),
    "t4": GpuPreset(16 * GiB, (7, 5)),
    "a10": GpuPreset(24 * GiB, (8, 6)),
    "l4": GpuPreset(24 * GiB, (8, 9)),
    "a100-40gb": GpuPreset(40 * GiB, (8, 0)),
    "a100-80gb": GpuPreset(80 * GiB, (8, 0)),
    "h100-80gb": GpuPreset(80 * GiB, (9, 0)),
}

_UNITS = {
    "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": MiB, "gib": GiB, "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Bytes in '24GB' (decimal), '24GiB' / '16000MiB' (binary). A unit is required."""
    match = _SIZE.match(text)
    if not match:
        raise UserError(
            f"malformed size {text!r}: expected a number and a unit, e.g. 24GB, 24GiB or 16000MiB"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    if value <= 0:
        raise UserError(f"size {text!r} must be above zero")
    return int(value)


def format_bytes(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


# --------------------------------------------------------------------------- usable memory

CUDA_CONTEXT_BYTES = 512 * MiB
"""CUDA context with lazy module loading (300-500 MB measured), rounded up."""
CUBLAS_WORKSPACE_BYTES = 32 * MiB
"""cuBLAS workspace on the training stream (up to 32 MiB on Hopper; 4-8 MiB on older cards)."""
ALLOCATOR_SLACK = 0.05
"""Share of the card lost to caching-allocator fragmentation (5-10%; expandable segments help)."""


def reserve_bytes(total: int) -> int:
    """What CUDA takes before and around our tensors: context, cuBLAS workspace, allocator slack.

    The fake-tensor verify measures tensors only; these costs live here, not in the estimate.
    """
    return CUDA_CONTEXT_BYTES + CUBLAS_WORKSPACE_BYTES + int(ALLOCATOR_SLACK * total)


def usable_bytes(total: int, margin: float, used_by_others: int = 0) -> int:
    """Bytes a plan's tensors may use: total minus the CUDA reserve, memory other processes
    already hold (display, other jobs; probe only) and the user's safety margin (share of total)."""
    if not 0 <= margin < 1:
        raise UserError(f"--margin {margin}: must be in [0, 1), e.g. 0.10")
    return max(0, int(total - reserve_bytes(total) - used_by_others - margin * total))


# --------------------------------------------------------------------------- NVML probe


@dataclass
class GpuInfo:
    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    reserved_bytes: int | None
    """Driver reserve (NVML memory info v2); None where the driver has only v1."""
    compute_capability: tuple[int, int]
    bf16: bool
    driver_version: str
    utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None


@dataclass
class GpuStats:
    """One poll of a GPU for the dashboard; None where NVML says not supported."""

    used_bytes: int
    total_bytes: int
    utilization_percent: int | None
    temperature_c: int | None
    power_w: float | None


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(read):
    """A metric NVML may not offer on this card or to this user: None instead of an error."""
    import pynvml

    try:
        return read()
    except (pynvml.NVMLError_NotSupported, pynvml.NVMLError_NoPermission, pynvml.NVMLError_FunctionNotFound,
            pynvml.NVMLError_Unknown):
        return None


def _nvml_init() -> bool:
    """Start NVML; False where there is no NVIDIA library or driver."""
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False  # LibraryNotFound, DriverNotLoaded, ...: no usable NVIDIA GPU here
    return True


def _memory(handle) -> tuple[int, int, int, int | None]:
    import pynvml

    try:
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
        return mem.total, mem.free, mem.used, mem.reserved
    except (pynvml.NVMLError_FunctionNotFound, pynvml.NVMLError_NotSupported, pynvml.NVMLError_ArgumentVersionMismatch):
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return mem.total, mem.free, mem.used, None


def _utilization(handle) -> int | None:
    import pynvml

    return _optional(lambda: int(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu))


def _temperature(handle) -> int | None:
    import pynvml

    return _optional(lambda: int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)))


def _power(handle) -> float | None:
    import pynvml

    return _optional(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)  # NVML reports mW


def probe_gpus() -> list[GpuInfo]:
    """Every NVIDIA GPU NVML sees, in NVML (PCI bus) order; [] without library or driver."""
    if not _nvml_init():
        return []
    import pynvml

    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            total, free, used, reserved = _memory(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            gpus.append(GpuInfo(
                index=index,
                name=_text(pynvml.nvmlDeviceGetName(handle)),
                uuid=_text(pynvml.nvmlDeviceGetUUID(handle)),
                total_bytes=int(total), free_bytes=int(free), used_bytes=int(used),
                reserved_bytes=None if reserved is None else int(reserved),
                compute_capability=(int(major), int(minor)),
                bf16=(int(major), int(minor)) >= (8, 0),
                driver_version=driver,
                utilization_percent=_utilization(handle),
                temperature_c=_temperature(handle),
                power_w=_power(handle),
            ))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def read_gpu_stats(index: int) -> GpuStats | None:
    """Memory, utilization, temperature and power of NVML device `index`; None without NVML or
    with no such device. Cheap enough to poll once a second."""
    if not _nvml_init():
        return None
    import pynvml

    try:
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        except pynvml.NVMLError:
            return None
        total, _free, used, _reserved = _memory(handle)
        return GpuStats(int(used), int(total), _utilization(handle), _temperature(handle), _power(handle))
    finally:
        pynvml.nvmlShutdown()


def _normalize_uuid(uuid: str) -> str:
    uuid = uuid.strip().lower()
    return uuid[4:] if uuid.startswith("gpu-") else uuid


def nvml_index_of_uuid(uuid: str, gpus: list[GpuInfo] | None = None) -> int | None:
    """The NVML index of the GPU with this UUID (with or without NVML's 'GPU-' prefix)."""
    wanted = _normalize_uuid(uuid)
    for gpu in probe_gpus() if gpus is None else gpus:
        if _normalize_uuid(gpu.uuid) == wanted:
            return gpu.index
    return None


def nvml_index_of_torch_device(device_index: int) -> int | None:
    """The NVML index of torch's cuda:`device_index`, which CUDA_VISIBLE_DEVICES may renumber;
    None when NVML is missing or does not list that GPU."""
    import torch

    uuid = str(torch.cuda.get_device_properties(device_index).uuid)
    return nvml_index_of_uuid(uuid)


# --------------------------------------------------------------------------- --gpu


@dataclass(frozen=True)
class GpuTarget:
    """The GPU a plan is for."""

    name: str
    total_bytes: int
    bf16: bool
    source: str  # "probe", "preset" or "size"
    used_by_others_bytes: int = 0
    """Memory other processes hold right now (probe only): the display, other jobs."""


def resolve_gpu(spec: str, gpu_index: int = 0) -> GpuTarget:
    """`auto` (probe NVML device `gpu_index`), a preset name, or a size such as 24GiB."""
    key = spec.strip().lower()
    if key == "auto":
        gpus = probe_gpus()
        if not gpus:
            raise UserError(
                "--gpu auto: no NVIDIA GPU found (no driver or NVML library); name the card instead, "
                "e.g. --gpu rtx4090 or --gpu 24GiB"
            )
        if not 0 <= gpu_index < len(gpus):
            raise UserError(f"--gpu-index {gpu_index}: this machine has GPUs 0..{len(gpus) - 1} (see `lowmem-tune probe`)")
        gpu = gpus[gpu_index]
        # `used` includes the driver reserve (v2 reports it apart); what is left is other processes
        others = gpu.used_bytes - (gpu.reserved_bytes or 0)
        return GpuTarget(gpu.name, gpu.total_bytes, gpu.bf16, "probe", max(0, others))
    if key in PRESETS:
        preset = PRESETS[key]
        return GpuTarget(key, preset.total_bytes, preset.bf16, "preset")
    if key and key[0].isdigit():
        size = parse_size(spec)
        # a bare size says nothing about the architecture: assume a card recent enough for bf16
        return GpuTarget(spec.strip(), size, True, "size")
    import difflib

    close = difflib.get_close_matches(key, list(PRESETS), n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"presets: {', '.join(PRESETS)}"
    raise UserError(f"--gpu {spec!r}: not auto, a preset or a size like 24GiB ({hint})")
