"""Shared helpers of the benchmark scripts: machine description, results, README blocks."""

from __future__ import annotations

import json
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")
"""The ``/proc/cpuinfo`` flags that decide how fast int8 and float kernels run."""


def machine() -> dict[str, Any]:
    """The CPU (its model, PyTorch's capability and the flags of :data:`FLAGS`), core count,
    torch version and threads, reported beside every figure: speed depends on them."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        text = cpuinfo.read_text()
        names = re.findall(r"model name\s*:\s*(.+)", text)
        cpu = names[0].strip() if names else cpu
        found = re.search(r"^flags\s*:\s*(.+)$", text, re.MULTILINE)
        flags = set(found.group(1).split()) if found else set()
    return {
        "cpu": cpu,
        "capability": torch.backends.cpu.get_cpu_capability(),
        "flags": [flag for flag in FLAGS if flag in flags],
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def machine_line(info: dict[str, Any]) -> str:
    vnni = "VNNI" if {"avx512_vnni", "avx_vnni"} & set(info["flags"]) else "no VNNI"
    return (
        f"{info['cpu']} ({info['capability']}, {vnni}), {info['cores']} cores, "
        f"torch {info['torch']} ({info['threads']} threads), Python {info['python']}"
    )


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    """``benchmarks/results/<name>.json`` and ``.md``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown + "\n")


def update_readme(block: str, markdown: str) -> None:
    """Replace the README text between ``<!-- BEGIN block -->`` and ``<!-- END block -->``."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    begin, end = f"<!-- BEGIN {block} -->", f"<!-- END {block} -->"
    if begin not in text or end not in text:
        raise SystemExit(f"README.md has no {begin} ... {end} block to update")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{markdown}\n{end}{tail}")
