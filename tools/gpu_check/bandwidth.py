"""Stage 2, bandwidth: the link every offloaded byte crosses.

cuda: pinned host buffers (`torch.empty(n, uint8, pin_memory=True)`, n a power of two), timed with
device events, best of REPEATS: host->device, device->host, both at once (one copy per direction
on two streams; GB/s of each and of the pair), and 512 small copies of 4 KiB each back to back on
one stream (microseconds per copy, wall from the first launch to the last one's end: what a
module-sized copy costs beyond its bytes). cpu: there is no link; the same copies are host memcpy,
recorded as such (`what`).

Record: `what`, `bytes` (per large copy), `h2d_gbps`, `d2h_gbps`, `both_h2d_gbps`,
`both_d2h_gbps`, `both_gbps` (sum), `small_copies`, `small_copy_bytes`, `small_copy_us`,
`small_copy_gbps`.
"""

from __future__ import annotations

import time

import torch

from tools.gpu_check.options import CheckOptions
from tools.gpu_check.stages import Outcome

REPEATS = 5
SMALL_COPIES, SMALL_BYTES = 512, 4096


def run(opts: CheckOptions, name: str) -> Outcome:
    n = 2**26 if opts.dry_run else 2**30  # 64 MiB / 1 GiB per copy
    if opts.device == "cuda":
        numbers = {"what": "pinned host <-> cuda device, device-event timed"} | _cuda(n)
    else:
        numbers = {"what": "host memcpy (--device cpu: no link to measure)"} | _cpu(n)
    numbers["headline"] = (f"H2D {numbers['h2d_gbps']:.1f} GB/s, D2H {numbers['d2h_gbps']:.1f}, both at once "
                           f"{numbers['both_gbps']:.1f}; {SMALL_COPIES} x {SMALL_BYTES // 1024} KiB: "
                           f"{numbers['small_copy_us']:.2f} us each")
    return Outcome(numbers)


def _cuda(n: int) -> dict:
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    back = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    dev2 = torch.empty(n, dtype=torch.uint8, device="cuda")
    up, down = torch.cuda.Stream(), torch.cuda.Stream()

    def timed(stream: torch.cuda.Stream, copy) -> float:
        """Seconds of `copy` on `stream`, from device events around it."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            start.record(stream)
            copy()
            end.record(stream)
        end.synchronize()
        return start.elapsed_time(end) / 1e3

    h2d = min(timed(up, lambda: dev.copy_(host, non_blocking=True)) for _ in range(REPEATS))
    d2h = min(timed(down, lambda: back.copy_(dev, non_blocking=True)) for _ in range(REPEATS))
    best_up, best_down, best_both = float("inf"), float("inf"), float("inf")
    for _ in range(REPEATS):  # both directions at once: each copy on its own stream, started together
        torch.cuda.synchronize()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
        begin = torch.cuda.Event(enable_timing=True)
        begin.record(torch.cuda.current_stream())
        for stream, (s, e), copy in ((up, marks[:2], lambda: dev2.copy_(host, non_blocking=True)),
                                     (down, marks[2:], lambda: back.copy_(dev, non_blocking=True))):
            stream.wait_event(begin)
            with torch.cuda.stream(stream):
                s.record(stream)
                copy()
                e.record(stream)
        torch.cuda.synchronize()
        t_up, t_down = marks[0].elapsed_time(marks[1]) / 1e3, marks[2].elapsed_time(marks[3]) / 1e3
        span = max(begin.elapsed_time(marks[1]), begin.elapsed_time(marks[3])) / 1e3
        best_up, best_down, best_both = min(best_up, t_up), min(best_down, t_down), min(best_both, span)

    small_host = torch.empty(SMALL_COPIES * SMALL_BYTES, dtype=torch.uint8, pin_memory=True)
    small_dev = torch.empty_like(small_host, device="cuda")
    src, dst = small_host.view(SMALL_COPIES, SMALL_BYTES), small_dev.view(SMALL_COPIES, SMALL_BYTES)
    small = float("inf")
    for _ in range(REPEATS):
        torch.cuda.synchronize()
        began = time.perf_counter()
        with torch.cuda.stream(up):
            for i in range(SMALL_COPIES):
                dst[i].copy_(src[i], non_blocking=True)
        up.synchronize()
        small = min(small, time.perf_counter() - began)
    return _numbers(n, h2d, d2h, best_up, best_down, best_both, small)


def _cpu(n: int) -> dict:
    a, b = torch.empty(n, dtype=torch.uint8).fill_(1), torch.empty(n, dtype=torch.uint8).fill_(2)
    c, d = torch.empty(n, dtype=torch.uint8).fill_(3), torch.empty(n, dtype=torch.uint8).fill_(4)

    def best(fn) -> float:
        times = []
        for _ in range(REPEATS):
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
        return min(times)

    one = best(lambda: b.copy_(a))
    back = best(lambda: a.copy_(b))
    both = best(lambda: (b.copy_(a), d.copy_(c)))  # one thread: the two copies run one after the other
    src = torch.empty(SMALL_COPIES, SMALL_BYTES, dtype=torch.uint8)
    dst = torch.empty_like(src)

    def small_copies() -> None:
        for i in range(SMALL_COPIES):
            dst[i].copy_(src[i])

    return _numbers(n, one, back, both / 2, both / 2, both, best(small_copies))


def _numbers(n: int, h2d: float, d2h: float, both_up: float, both_down: float, both: float, small: float) -> dict:
    """GB/s (1e9 bytes per second) from the best seconds of each measurement."""
    return {"bytes": n, "h2d_gbps": n / h2d / 1e9, "d2h_gbps": n / d2h / 1e9,
            "both_h2d_gbps": n / both_up / 1e9, "both_d2h_gbps": n / both_down / 1e9, "both_gbps": 2 * n / both / 1e9,
            "small_copies": SMALL_COPIES, "small_copy_bytes": SMALL_BYTES, "small_copy_us": small / SMALL_COPIES * 1e6,
            "small_copy_gbps": SMALL_COPIES * SMALL_BYTES / small / 1e9}
