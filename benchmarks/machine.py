"""What a benchmark ran on: the CPU, its vector capability, a peak-FLOP/s estimate, threads, load and versions.

    .venv/bin/python -m benchmarks.machine

`describe_machine()` reads this machine (/proc/cpuinfo, torch, the load average); `describe_cpuinfo(text)` does the
parsing from text, so tests can feed it another machine's /proc/cpuinfo. The peak is an estimate, not a measurement:
physical cores x clock x FLOP per cycle for the widest vector unit, assuming 2 FMA units per core (most server cores;
some AVX-512 Xeons have one, so half). The clock is the base clock a VM reports ('cpu MHz') or cpufreq's maximum where
the kernel exposes it; sustained AVX-512 clocks are often lower, turbo higher.
"""
import importlib.metadata
import os
import platform
from pathlib import Path

import torch

from modeling_detr_custom.fast_paths import cpu_backward_layout, cpu_bf16_support

# fp32 FLOP per cycle per core with 2 FMA units: lanes x 2 (multiply + add) x 2 units
FP32_FLOP_PER_CYCLE = {"AVX-512": 64, "AVX2": 32, "AVX": 16, "SSE": 8}
AMX_BF16_FLOP_PER_CYCLE = 1024   # per core: Intel's AMX figure (Sapphire Rapids) for bf16 tile multiply-adds


def parse_cpuinfo(text: str) -> list[dict]:
    """/proc/cpuinfo as one dict per logical CPU ("processor" block), keys and values as the kernel writes them."""
    processors = []
    for block in text.strip().split("\n\n"):
        entry = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                entry[key.strip()] = value.strip()
        if "processor" in entry:
            processors.append(entry)
    return processors


def vector_capability(flags: set) -> str:
    """The widest fp32 vector unit the flags announce: AVX-512, AVX2 (with FMA), AVX or SSE."""
    if "avx512f" in flags:
        return "AVX-512"
    if "avx2" in flags and "fma" in flags:
        return "AVX2"
    return "AVX" if "avx" in flags else "SSE"


def fp32_flop_per_cycle(vendor: str, family: int, model: int, capability: str) -> tuple[int, str]:
    """(fp32 FLOP per cycle per core, the assumption behind it). AMD cores whose datapaths are narrower than the
    instructions they accept run the wide instructions in two halves, so their peak is that of the datapath."""
    if vendor == "AuthenticAMD" and family == 0x17 and model < 0x30 and capability == "AVX2":
        return 16, "Zen 1/Zen+: 2 x 128-bit FMA datapaths, AVX2 instructions split in two"
    if vendor == "AuthenticAMD" and family == 0x19 and capability == "AVX-512":
        return 32, "Zen 4: AVX-512 instructions run on 2 x 256-bit FMA datapaths"
    return FP32_FLOP_PER_CYCLE[capability], f"{capability} with 2 FMA units assumed"


def describe_cpuinfo(text: str, max_mhz: float | None = None) -> dict:
    """The CPU part of `describe_machine` from /proc/cpuinfo text (`max_mhz`: cpufreq's maximum, when known)."""
    processors = parse_cpuinfo(text)
    if not processors:
        raise ValueError("no 'processor' entries in the cpuinfo text")
    first = processors[0]
    flags = set(first.get("flags", "").split())
    vendor = first.get("vendor_id", "unknown")
    family, model = int(first.get("cpu family", "0")), int(first.get("model", "0"))
    capability = vector_capability(flags)
    native_bf16 = sorted(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    fp32_per_cycle, assumption = fp32_flop_per_cycle(vendor, family, model, capability)
    if "amx_bf16" in flags:
        bf16_per_cycle, bf16_unit = AMX_BF16_FLOP_PER_CYCLE, "AMX"
    elif "avx512_bf16" in flags:
        # dot products of bf16 pairs into fp32 lanes: twice the fp32 rate
        bf16_per_cycle, bf16_unit = 2 * fp32_per_cycle, "AVX512_BF16"
    else:
        bf16_per_cycle, bf16_unit = None, None    # emulated through fp32: no faster than fp32
    # SMT siblings share one core's FMA units: count distinct (socket, core) pairs where the kernel reports them
    physical = {(p.get("physical id"), p.get("core id")) for p in processors if "core id" in p}
    cores = len(physical) or len(processors)
    mhz = max_mhz or float(first.get("cpu MHz", "0")) or None
    return {
        "model_name": first.get("model name", "unknown"),
        "vendor": vendor,
        "family": family,
        "model": model,
        "capability": capability,
        "native_bf16_flags": native_bf16,
        "logical_cpus": len(processors),
        "cores": cores,
        "mhz": mhz,
        "mhz_source": "cpufreq max" if max_mhz else "cpu MHz",
        "fp32_flop_per_cycle": fp32_per_cycle,
        "peak_assumption": assumption,
        "peak_fp32_gflops": cores * mhz * 1e-3 * fp32_per_cycle if mhz else None,
        "bf16_unit": bf16_unit,
        "peak_bf16_gflops": cores * mhz * 1e-3 * bf16_per_cycle if mhz and bf16_per_cycle else None,
    }


def limit_to_kernels(machine: dict, torch_capability: str) -> dict:
    """`machine` with the fp32 peak of the kernels that run: where AVX-512 is switched off on an AVX-512 CPU
    (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2, to measure what an AVX2-only CPU runs), the AVX2 peak."""
    if machine["capability"] != "AVX-512" or torch_capability.startswith("AVX512") or not machine.get("mhz"):
        return machine
    per_cycle, _ = fp32_flop_per_cycle(machine["vendor"], machine["family"], machine["model"], "AVX2")
    return {**machine, "fp32_flop_per_cycle": per_cycle,
            "peak_assumption": f"AVX2 kernels on an AVX-512 CPU (torch capability {torch_capability}), 2 FMA units "
                               "assumed",
            "peak_fp32_gflops": machine["peak_fp32_gflops"] * per_cycle / machine["fp32_flop_per_cycle"]}


def _max_mhz() -> float | None:
    path = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")     # what lscpu shows as 'CPU max MHz'
    try:
        return int(path.read_text()) / 1000
    except (OSError, ValueError):
        return None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe_machine(threads: int | None = None) -> dict:
    """This machine: CPU (see `describe_cpuinfo`), torch's capability, usable CPUs, torch threads, the 1-minute load
    average now, and the versions of torch, transformers and timm. `threads`: what the benchmarks will set."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        machine = describe_cpuinfo(cpuinfo.read_text(), _max_mhz())
    else:   # not Linux: what the standard library knows, no peak
        machine = {"model_name": platform.processor() or platform.machine(), "vendor": "unknown", "family": None,
                   "model": None, "capability": "unknown", "native_bf16_flags": [], "logical_cpus": os.cpu_count(),
                   "cores": os.cpu_count(), "mhz": None, "peak_fp32_gflops": None, "peak_bf16_gflops": None}
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if usable < machine["logical_cpus"]:     # a CPU set (container, taskset): the peak of the CPUs we may use
        share = usable / machine["logical_cpus"]
        for key in ("peak_fp32_gflops", "peak_bf16_gflops"):
            machine[key] = machine[key] and machine[key] * share
    torch_capability = torch.backends.cpu.get_cpu_capability()
    machine = limit_to_kernels(machine, torch_capability)
    machine.update(
        torch_capability=torch_capability,
        usable_cpus=usable,
        torch_threads=threads or torch.get_num_threads(),
        load_1min=os.getloadavg()[0],
        versions={"torch": torch.__version__, **{p: _version(p) for p in ("transformers", "timm")}},
    )
    return machine


def is_noisy(machine: dict) -> bool:
    """Whether other processes' load (1-minute average above half the usable CPUs) makes timings noisy."""
    return machine["load_1min"] > 0.5 * machine["usable_cpus"]


def format_peak(machine: dict) -> str:
    if not machine.get("peak_fp32_gflops"):
        return "peak estimate: unknown (no clock in /proc/cpuinfo)"
    line = (f"peak estimate {machine['peak_fp32_gflops']:.0f} GFLOP/s fp32 = {machine['cores']} cores x "
            f"{machine['mhz'] / 1e3:.2f} GHz ({machine['mhz_source']}) x {machine['fp32_flop_per_cycle']} FLOP/cycle "
            f"({machine['peak_assumption']})")
    if machine.get("peak_bf16_gflops"):
        line += f"; bf16 {machine['peak_bf16_gflops']:.0f} GFLOP/s ({machine['bf16_unit']})"
    return line + "; an estimate, not a measurement"


def format_machine(machine: dict) -> str:
    """A few lines for the top of a benchmark's output."""
    bf16 = ", ".join(machine["native_bf16_flags"]) or "none (bf16 emulated)"
    bf16_native, bf16_why = cpu_bf16_support()
    layout, layout_why = cpu_backward_layout()
    versions = ", ".join(f"{p} {v}" for p, v in machine["versions"].items())
    lines = [
        f"machine: {machine['model_name']} ({machine['vendor']}, family {machine['family']} model "
        f"{machine['model']}), {machine['cores']} cores / "
        f"{machine['logical_cpus']} logical CPUs ({machine['usable_cpus']} usable), torch threads "
        f"{machine['torch_threads']}",
        f"vector: {machine['capability']}, native bf16: {bf16}; torch CPU capability {machine['torch_capability']}",
        f"bf16 autocast on CPU: {'used' if bf16_native else 'replaced by fp32'} ({bf16_why}); trained "
        f"convolutions run {'NHWC' if layout == 'channels_last' else 'NCHW'} ({layout_why})",
        format_peak(machine),
        f"load average (1 min) at start: {machine['load_1min']:.2f}",
        versions,
    ]
    if is_noisy(machine):
        lines.insert(4, f"WARNING: load {machine['load_1min']:.2f} > 0.5 x {machine['usable_cpus']} usable CPUs: "
                        "other processes share the CPUs, absolute figures are noisy (ratios from interleaved rounds "
                        "less so)")
    return "\n".join(lines)


if __name__ == "__main__":
    print(format_machine(describe_machine()))
