"""The machine a benchmark ran on, printed beside every figure (CPUs differ: see docs/benchmarks.md)."""

from __future__ import annotations

import subprocess


def cpu() -> str:
    """lscpu's model name, CPU count and the vector / matrix ISA flags that decide kernel speed."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = lambda name: next((l.split(":", 1)[1].strip() for l in out.splitlines() if l.startswith(name)), "?")
    flags = [f for f in field("Flags").split() if f.startswith(("avx512f", "avx512_bf16", "amx", "avx2"))]
    return f"{field('Model name')}, {field('CPU(s)')} CPUs, {' '.join(sorted(set(flags)))}"
