"""keep_freed_memory: large tensors come from glibc's heap (kept and reused after free)
instead of a fresh mmap each time, whose pages fault in again on every use."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import ctypes, sys, torch
from detox_exp.fast.memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd",
        "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
before = libc.mallinfo2().hblkhd
x = torch.empty(4 * 1024 * 1024).fill_(1.0)  # 16 MB
print((libc.mallinfo2().hblkhd - before) / 2**20)
"""


def _mmapped_mb(mode: str) -> float:
    """MB of the 16 MB tensor that glibc served by mmap, in a fresh process."""
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return float(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_large_tensors_come_from_the_heap() -> None:
    assert _mmapped_mb("default") >= 16  # a fresh mapping, handed back on free
    assert _mmapped_mb("tuned") == 0
