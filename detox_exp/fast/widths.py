"""Tensor widths rounded up to a multiple (switch: ``fast.width_multiple``).

Prompt and response widths are rounded up to ``fast.width_multiple``. oneDNN, which runs
bf16 matmuls on CPU, caches a kernel per shape: with every batch a new width, a bf16
benchmark run grew from 730 to 1,150 MB over 10 steps; rounded widths keep it flat. The
padding is masked and costs no measurable time in fp32.
"""

from __future__ import annotations


def round_up(n: int, multiple: int, cap: int | None = None) -> int:
    """``n`` rounded up to a multiple of ``multiple`` (at most ``cap``)."""
    n = -(-n // multiple) * multiple
    return n if cap is None else min(n, cap)
