"""What this CPU can do fast: its ISA flags, and whether it has native bf16 arithmetic.

Training picks its precision from this (pipeline.training, `amp: auto`), and benchmark records
carry it. The answer follows what the math libraries will really use: oneDNN and ATen can be
capped below the hardware (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY, used to emulate an AVX2
host on an AVX-512 one), and bf16 without native instructions runs several times slower than fp32
(measured once: ResNet56 forward at batch 128 under an AVX2 cap, 1445 ms in bf16 vs 261 ms fp32).
"""

import functools
import os
from pathlib import Path

# The instruction-set flags that decide which kernels run (Linux /proc/cpuinfo names).
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16",
             "amx_bf16", "amx_int8", "avx512_fp16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps that exclude its bf16 instructions (oneDNN's names, upper case).
ONEDNN_CAPS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI")


def cpuinfo_field(*names: str) -> str | None:
    """The first CPU's value of the first of `names` in Linux /proc/cpuinfo (case-insensitive
    key); None where the file or the key is missing."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.lower().startswith(names):
            return line.split(":", 1)[1].strip()
    return None


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The first CPU's feature flags (Linux); empty where /proc/cpuinfo is not readable."""
    return frozenset((cpuinfo_field("flags", "features") or "").split())


def isa_caps() -> dict[str, str | None]:
    """The caps put on oneDNN and ATen by environment variables (None = not capped)."""
    return {"ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA")
            or os.environ.get("DNNL_MAX_CPU_ISA"),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY")}


def aten_capability() -> str:
    """ATen's kernel dispatch level here ("AVX512", "AVX2", "DEFAULT", ...); imports torch,
    which is why this module does not at load (pipeline.io says why)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def native_bf16(flags: frozenset[str] | None = None) -> bool:
    """Whether bf16 convolutions and matmuls run on native instructions here (and are not
    capped away): only then is bf16 autocast on the CPU faster than fp32."""
    flags = cpu_flags() if flags is None else flags
    if not any(flag in flags for flag in NATIVE_BF16_FLAGS):
        return False
    onednn_cap = (isa_caps()["ONEDNN_MAX_CPU_ISA"] or "ALL").upper()
    aten = aten_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return onednn_cap not in ONEDNN_CAPS_WITHOUT_BF16 and aten.startswith("AVX512")


def describe() -> dict[str, object]:
    """This CPU's ISA as recorded with measurements: flags present, caps, ATen's dispatch."""
    return {"isa_flags": sorted(flag for flag in ISA_FLAGS if flag in cpu_flags()),
            "aten_capability": aten_capability(),
            "isa_caps": {name: value for name, value in isa_caps().items() if value},
            "native_bf16": native_bf16()}
