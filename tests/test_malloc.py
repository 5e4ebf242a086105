"""The allocator setting that motion correction turns on (tamis._malloc)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt only",
)
def test_keep_freed_memory_applies_once_and_reuses_pages():
    """In a fresh interpreter: applied (True, twice), and a freed 256 MB block comes back
    without page faults; without the setting the block goes back to the kernel and comes back
    with at least one fault per 2 MB (huge) page, 128, or one per 4 KB page, 65,536."""
    code = """
import resource, sys
import torch
from tamis._malloc import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory() and keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
a = torch.ones(1 << 26); del a
before = faults()
b = torch.ones(1 << 26); del b
print(faults() - before)
"""
    out = {}
    for mode in ("on", "off"):
        run = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        out[mode] = int(run.stdout.split()[-1])
    assert out["on"] < 64 and out["off"] >= 128
