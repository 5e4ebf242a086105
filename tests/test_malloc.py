"""The allocator setting that motion correction and the 2D/3D engine turn on (tamis._malloc)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

_PROBE = """
import resource, sys
import torch
from tamis._malloc import keep_freed_memory
if sys.argv[1] == "on":
    assert keep_freed_memory() and keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
a = torch.ones(1 << 26)  # 256 MB
held = rss_mb()
del a
freed = rss_mb()
before = faults()
b = torch.ones(1 << 25)  # 128 MB: fits in the freed block whatever the alignment padding
del b
print(held, freed, faults() - before)
"""


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt only",
)
# arena_max=1 puts every thread's small allocations in the main heap, beside the block
@pytest.mark.parametrize("tunables", ["", "glibc.malloc.arena_max=1"])
def test_keep_freed_memory_keeps_and_reuses_a_freed_block(tunables):
    """In a fresh interpreter: applied (True, twice); a freed 256 MB block stays with the
    process and a 128 MB block is then served from it without page faults (0 measured; a
    fresh 128 MB takes at least 64 faults even with 2 MB pages). Without the setting the
    block goes back to the kernel on free."""
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    out = {}
    for mode in ("on", "off"):
        run = subprocess.run(
            [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, env=env
        )
        assert run.returncode == 0, run.stderr
        held, freed, faults = run.stdout.split()[-3:]
        out[mode] = (float(held), float(freed), int(faults))
    held, freed, faults = out["on"]
    assert freed > held - 32 and faults < 32, out
    held, freed, _ = out["off"]
    assert freed < held - 200, out
