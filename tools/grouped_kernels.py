"""`python -m tools.grouped_kernels [--device cpu|cuda] [--experts E --hidden H --width I --top-k K --tokens T]`:
one MoE layer's routed SwiGLU experts over T tokens (random routing, random weights), computed four ways
side by side, the best of 3 timings each: a loop of per-expert linears over weights reordered for the
device's matmul (what `tasks.expert_groups` runs on the cpu), the same loop over plain weights,
`torch._grouped_mm` over the experts' stacked weights, and a batched matmul over the experts' tokens
padded to the largest count. Prints ms per layer, GFLOP/s and each result's largest difference from the
plain loop. The default shape is the bench DeepSeek-V2-Lite-like layer in a 256-sequence decode step."""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from moegen.models.linear import linear, pack_linear


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--width", type=int, default=528)
    ap.add_argument("--top-k", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    dev, dtype = torch.device(a.device), getattr(torch, a.dtype)
    E, H, I, K, T = a.experts, a.hidden, a.width, a.top_k, a.tokens
    torch.manual_seed(0)
    gate, up, down = ([torch.randn(*shape, device=dev, dtype=dtype) * 0.02 for _ in range(E)]
                      for shape in ((I, H), (I, H), (H, I)))
    picks = torch.randint(0, E, (T * K,), device=dev)
    counts = torch.bincount(picks, minlength=E).tolist()
    rows = torch.randn(T, H, device=dev, dtype=dtype)[picks.argsort(stable=True) // K]  # [T*K, H] sorted by expert
    starts = [0]
    for n in counts:
        starts.append(starts[-1] + n)
    packed = [[pack_linear(w) for w in ws] for ws in (gate, up, down)]
    gate_up = torch.stack([torch.cat([g, u]) for g, u in zip(gate, up)]).transpose(1, 2)  # [E, H, 2I]
    down_t = torch.stack(down).transpose(1, 2)  # [E, I, H]
    offsets = torch.tensor(starts[1:], dtype=torch.int32, device=dev)

    def loop(g, u, d, mm=linear):
        out = torch.empty_like(rows)
        for e in range(E):
            x = rows[starts[e]: starts[e + 1]]
            if len(x):
                out[starts[e]: starts[e + 1]] = mm(F.silu(mm(x, g[e])) * mm(x, u[e]), d[e])
        return out

    def grouped():
        h = torch._grouped_mm(rows, gate_up, offs=offsets)
        return torch._grouped_mm(F.silu(h[:, :I]) * h[:, I:], down_t, offs=offsets)

    def padded():
        most = max(counts)
        at = torch.cat([torch.arange(n, device=dev) + e * most for e, n in enumerate(counts)])
        x = rows.new_zeros(E * most, H)
        x[at] = rows
        h = torch.bmm(x.view(E, most, H), gate_up)
        return torch.bmm(F.silu(h[..., :I]) * h[..., I:], down_t).reshape(E * most, H)[at]

    kernels = {"loop, reordered weights": lambda: loop(*packed), "loop, plain weights": lambda: loop(gate, up, down, F.linear),
               "torch._grouped_mm": grouped, "padded bmm": padded}
    reference = loop(gate, up, down, F.linear)
    flops = 2 * T * K * 3 * H * I
    print(f"{E} experts of {H}x{I}, top-{K}, {T} tokens ({min(counts)}-{max(counts)} per expert), {a.dtype} on {dev}, "
          f"{torch.get_num_threads()} threads")
    for name, kernel in kernels.items():
        try:
            diff = (kernel().float() - reference.float()).abs().max().item()
        except (RuntimeError, NotImplementedError) as exc:
            print(f"  {name:<26} unavailable here: {str(exc).splitlines()[0][:100]}")
            continue
        best = min(_timed(kernel, dev) for _ in range(3))
        print(f"  {name:<26} {best * 1e3:8.2f} ms {flops / best / 1e9:8.1f} GFLOP/s  max diff {diff:.1e}")


def _timed(fn, dev: torch.device, repeats: int = 5) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


if __name__ == "__main__":
    main()
