"""Stage 1, preflight: what the machine is, and whether everything moegen imports is there.

Record: `versions_all` (package -> version or null), `imports` (module -> "ok" or the error;
a required one failing fails the stage), `optional` (the same for packages only some tools use),
`cuda` (device name, capability, total and free bytes; null on cpu), `nvidia_smi` (its output,
or why there is none), `host` (cores, memory, disk free under the work dir), `wheels` (what
tools/gpu_check.sh installed from .whl/), `prepared` (the parity data's manifest, or null).
"""

from __future__ import annotations

import importlib
import os
import platform
import subprocess

from tools.gpu_check import host, records
from tools.gpu_check.options import CheckOptions
from tools.gpu_check.prepare import manifest
from tools.gpu_check.stages import Outcome

PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "uvloop", "click", "orjson", "perfetto",
            "protobuf", "numpy", "accelerate", "mistral_common", "sentencepiece", "viztracer")
# What moegen's runtime, loader, tracer and CLI import (the stages need all of them).
REQUIRED = ("torch", "transformers", "tokenizers", "safetensors", "uvloop", "click", "orjson", "perfetto",
            "google.protobuf", "moegen.runtime.engine", "moegen.models.loader", "moegen.checkpoints.make",
            "moegen.trace.recorder", "moegen.trace.summarize", "moegen.cli")
# Only `make-model --size small/bench` (mistral_common, sentencepiece) and `trace view` (viztracer) need these.
OPTIONAL = ("accelerate", "mistral_common", "sentencepiece", "viztracer")


def run(opts: CheckOptions, name: str) -> Outcome:
    imports = {m: _try_import(m) for m in REQUIRED}
    optional = {m: _try_import(m) for m in OPTIONAL}
    cuda = _cuda() if opts.device == "cuda" else None
    smi = _nvidia_smi() if opts.device == "cuda" else {"skipped": "--device cpu"}
    memory = host.memory()
    numbers = {
        "platform": platform.platform(), "versions_all": {p: records.installed(p) for p in PACKAGES},
        "imports": imports, "optional": optional, "cuda": cuda, "nvidia_smi": smi,
        "host": {"cores": os.cpu_count(), "memory_bytes": memory["total"], "available_bytes": memory["available"],
                 "work_disk_free_bytes": host.disk_free(opts.work), "work_in_memory": host.in_memory(opts.work)},
        "wheels": {"installed": os.environ.get("GPU_CHECK_WHEELS", "").split(),
                   "status": os.environ.get("GPU_CHECK_WHEELS_STATUS", "none carried")},
        "prepared": manifest(opts.prepared),
    }
    failed = sorted(m for m, r in imports.items() if r != "ok")
    problems = [f"imports failed: {', '.join(failed)}"] if failed else []
    if opts.device == "cuda" and not (cuda or {}).get("available"):
        problems.append(f"torch sees no CUDA device ({(cuda or {}).get('error', 'torch.cuda.is_available() is False')})")
    if numbers["prepared"] is None:
        problems.append(f"no prepared parity data in {opts.prepared} (run `bash tools/gpu_check.sh --prepare` "
                        "on the CPU first and carry .gpu_check)")
    gpu = f"{cuda['name']}, {cuda['total_bytes'] / 2**30:.0f} GiB, driver {smi.get('driver', '?')}" if (
        cuda or {}).get("available") else opts.device
    numbers["headline"] = (f"torch {numbers['versions_all']['torch']}, {gpu}; "
                           + ("; ".join(problems) if problems else "imports ok")
                           + f"; {len(numbers['wheels']['installed'])} wheels installed")
    return Outcome(numbers, "; ".join(problems) or None)


def _try_import(module: str) -> str:
    try:
        importlib.import_module(module)
        return "ok"
    except Exception as exc:  # ImportError, or anything a broken package raises while importing
        return f"{type(exc).__name__}: {exc}"


def _cuda() -> dict:
    import torch

    try:
        if not torch.cuda.is_available():
            return {"available": False}
        free, total = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(0)
        return {"available": True, "name": props.name, "capability": f"{props.major}.{props.minor}",
                "devices": torch.cuda.device_count(), "total_bytes": total, "free_bytes": free,
                "multiprocessors": props.multi_processor_count, "cudnn": torch.backends.cudnn.version()}
    except Exception as exc:  # a driver/runtime mismatch surfaces here
        return {"available": False, "error": f"{type(exc).__name__}: {exc}"}


def _nvidia_smi() -> dict:
    query = "driver_version,name,memory.total,pcie.link.gen.current,pcie.link.width.current,power.limit"
    try:
        full = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=15)
        csv = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"skipped": f"nvidia-smi: {type(exc).__name__}: {exc}"}
    fields = [f.strip() for f in csv.stdout.strip().splitlines()[0].split(",")] if csv.stdout.strip() else []
    return {"output": full.stdout[-4000:], "rc": full.returncode,
            **dict(zip(("driver", "name", "memory", "pcie_gen", "pcie_width", "power_limit"), fields))}
