"""Where the engines run: the Ray cluster at an address (`ray start --head` prints it; `$RAY_ADDRESS`), or a
local one moegen starts and shuts down; and how many CPUs and GPUs each engine takes on it."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Share:
    """One engine's resources on the cluster."""

    num_cpus: float
    num_gpus: float
    threads: int  # its torch intra-op threads


@contextlib.contextmanager
def connected(address: str | None, say) -> Iterator[None]:
    """Connected to the cluster at `address` (or $RAY_ADDRESS) for the block; without either, a local cluster on
    this machine's cores, shut down after."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if ray.is_initialized():  # a caller's own connection (tests, notebooks) stays theirs
        yield
        return
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True, logging_level="WARNING",
                 configure_logging=True)
    except ConnectionError as exc:
        raise ConnectionError(f"--ray-address {address}: can't reach a Ray cluster there ({exc}); start one with "
                              "`ray start --head` and pass the address it prints, or leave --ray-address and "
                              "$RAY_ADDRESS unset for a local one") from exc
    say(f"ray: connected to {address or 'a cluster on this machine'}: {_describe(ray.cluster_resources())}")
    try:
        yield
    finally:
        ray.shutdown()


def share(engines: int) -> Share:
    """Each engine's share of the cluster: a GPU each where it has GPUs (and the CPUs beside each GPU, less
    one for Ray's own tasks), else the CPUs less one, split between the engines (fractions on a small
    node, so reading and parsing the dataset still get a core); its torch threads are its share of all
    the cores (reading and parsing are over before the engines compute)."""
    import ray

    resources = ray.cluster_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    if gpus >= 1:
        if engines > gpus:
            raise ValueError(f"--engines {engines}: the cluster has {gpus:g} GPUs; one engine per GPU at most")
        per = max(1.0, cpus / gpus - 1)
        return Share(per, 1.0, int(per))
    per = max(cpus - 1, 1.0) / engines if cpus > 1 else cpus / engines
    return Share(per, 0.0, max(1, int(cpus // engines)))  # threads: its cores, once Ray's reading is done


def _describe(resources: dict) -> str:
    parts = [f"{resources.get('CPU', 0):g} CPUs"] + ([f"{resources['GPU']:g} GPUs"] if resources.get("GPU") else [])
    return ", ".join(parts)
