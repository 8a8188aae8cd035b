"""Importing moegen before torch puts torch's large cpu tensors in transparent huge pages (moegen/__init__.py)."""

import os
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import moegen, os, torch
t = torch.empty(64 << 20, dtype=torch.uint8)
t.fill_(1)
address, huge = t.data_ptr(), 0
lines = open("/proc/self/smaps").read().splitlines()
for i, line in enumerate(lines):
    head = line.split()[0]
    if "-" in head and all(c in "0123456789abcdef-" for c in head):
        lo, hi = (int(x, 16) for x in head.split("-"))
        inside = lo <= address < hi
    elif inside and line.startswith("AnonHugePages:"):
        huge = int(line.split()[1])
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge)
"""


def _probe(env: dict) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True).stdout
    flag, huge_kib = out.split()
    return flag, int(huge_kib)


def test_large_tensors_in_huge_pages_where_the_kernel_offers_them():
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    flag, huge_kib = _probe(env)
    assert flag == "1"
    mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    offered = mode.is_file() and "[never]" not in mode.read_text()
    if offered:  # a 64 MiB tensor, 2 MiB aligned by torch: most of it in huge pages
        assert huge_kib >= 32 * 1024, huge_kib
    assert _probe(env | {"THP_MEM_ALLOC_ENABLE": "0"}) == ("0", 0)  # the user's choice is kept
