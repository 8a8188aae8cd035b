"""What a benchmark ran on, and the compute it could have had: a matmul peak measured in the same run."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version

import torch
import torch.nn.functional as F


def machine() -> dict:
    """CPU, cores, memory and library versions, for the JSON every bench writes."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0
    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "memory_gib": round(memory / 2**30, 1), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": version("transformers"), "moegen": version("moegen"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def gemm_flops(tokens: int, k: int, n: int, dtype: torch.dtype = torch.float32, seconds: float = 1.0,
               device: str = "cpu") -> float:
    """Measured FLOP/s of x[tokens, k] @ w[n, k]^T on `device` (best of repeated runs over ~`seconds`)."""
    x, w = torch.randn(tokens, k, dtype=dtype, device=device), torch.randn(n, k, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    F.linear(x, w)  # warm-up: thread pool, packing buffers
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        F.linear(x, w)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * tokens * k * n / best


def matmul_peak(device: str = "cpu") -> float:
    """FLOP/s of a large square float32 GEMM on `device`: the ceiling a run's achieved FLOP/s is set against."""
    return max(gemm_flops(2048, 2048, 2048, device=device), gemm_flops(4096, 1024, 4096, device=device))
