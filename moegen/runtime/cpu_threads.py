"""How the runtime's launches use a small CPU's threads (the cpu backend; on other devices nothing
here changes anything): which launches run on one intra-op thread, and which are handed to the
compute stream's lanes (`cpu_lanes` below) to run side by side.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch
from torch import Tensor

# A launch on the cpu backend below both sizes runs on one intra-op thread. On 2 cores the event
# loop's thread shares the cores with the compute thread's OpenMP team, and every parallel op of a
# 2-thread launch waits for a descheduled team member: a DeepSeek-V2-Lite-like expert (4.9 MB of
# weights) over 12-24 tokens took 1.4 ms in a run on 2 threads against 0.7 ms on one (0.35-0.45 ms
# alone either way), while over 256 tokens (6e8 FLOPs) it is 1.8x faster on two. A launch reading
# more weights than SMALL_LAUNCH_BYTES is bound by memory bandwidth, which one thread can't fill
# (a Mixtral-like expert, 25 MB, over 16 tokens: 2.7 ms on two threads, 4.6 ms on one).
# Serve-offline, 128 prompts x 32 tokens, two runs each: DeepSeek-V2-Lite-like 265-289 -> 321-348
# decode tok/s.
SMALL_LAUNCH_FLOPS = 2e8
SMALL_LAUNCH_BYTES = 8 * 2**20
# Expert and MLP launches below LANE_FLOPS are submitted as concurrent: on the cpu backend a layer's
# launches then run side by side on the compute stream's lanes (measurements: cpu_lanes).
# 6.4e9 FLOPs is a Mixtral-like expert over ~500 tokens: decode launches go to the lanes, an 8k-token
# prefill step's (2k tokens each) don't.
LANE_FLOPS = 6.4e9


def side_by_side(flops: float, alone: bool = False) -> bool:
    """Whether an expert or MLP launch of `flops` is submitted as concurrent (see LANE_FLOPS). A launch
    `alone` in its layer (a dense layer's MLP) is not: on a lane it would run on one core while the
    others wait (DeepSeek-V2-Lite-like decode, the dense MLP over 256 tokens: ~50 ms on a lane)."""
    return not alone and flops < LANE_FLOPS


@contextmanager
def host_threads(x: Tensor, flops: float, weight_bytes: int):
    """Run the enclosed launch on one intra-op thread when it is small and on the cpu (see
    SMALL_LAUNCH_FLOPS); the thread count is restored after. Only the compute stream's thread launches."""
    n = torch.get_num_threads()
    if x.device.type != "cpu" or flops >= SMALL_LAUNCH_FLOPS or weight_bytes >= SMALL_LAUNCH_BYTES or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


LANES_ENV = "MOEGEN_CPU_LANES"


def cpu_lanes() -> int:
    """Lanes of the cpu compute stream: 2 when torch has at least 2 intra-op threads (each lane then
    runs with half of them), or what MOEGEN_CPU_LANES says (1 turns lanes off).

    Why: on 2 cores a Mixtral-like expert over 64 tokens runs at 93-129 GFLOP/s on a 2-thread
    OpenMP team but two experts side by side on one thread each reach 130-135 (an OpenMP team
    splits a small GEMM poorly and its idle member spins against the event loop's thread); in
    serve-offline, 256 prompts x 64 new tokens, the decode step went 384 -> 330 ms. Large launches
    (an 8k-token prefill step's experts, 2k tokens each) were slower side by side in a run (5.4 ->
    6.0 s per step: the lanes' shares of a layer's tokens are uneven), so only launches under
    LANE_FLOPS are submitted as concurrent."""
    raw = os.environ.get(LANES_ENV)
    if raw is None:
        return 2 if torch.get_num_threads() >= 2 else 1
    try:
        lanes = int(raw)
    except ValueError:
        lanes = 0
    if lanes < 1:
        raise ValueError(f"{LANES_ENV}={raw!r}: expected a whole number of lanes >= 1 (1 turns lanes off)")
    return lanes
