"""The GPU check: what a session lent a GPU runs, once, as one prepared command.

    bash tools/gpu_check.sh --fetch-wheels      # before the session, here: .whl/ (cp312 perfetto, protobuf, orjson)
    bash tools/gpu_check.sh --prepare           # before the session, here: .gpu_check/ (parity data)
    bash tools/gpu_check.sh                     # on the GPU machine, carrying .whl and .gpu_check
    bash tools/gpu_check.sh --device cpu --dry-run

Stages, in order of value (stages.py; each in its own process under its own timeout, runner.py):

1. preflight (preflight.py): versions, imports, nvidia-smi, host, wheels, prepared data.
2. bandwidth (bandwidth.py): pinned H2D, D2H, both at once, 512 small copies.
3. parity (parity.py, its data from prepare.py): the runtime's tokens against the CPU reference's,
   float32 exact and bfloat16 within a measured tolerance, decode under the sync debug mode.
4. offload: 4.1 offload.write (mixtral_shaped.py: the checkpoint, sized by sizing.py), then
   4.2 offload.module and 4.3 offload.model (offload.py), and an `offload` record summing them up.
5. trace (trace.py): the module run's trace, summarised and clock-checked.
6. fp8 (fp8.py, the block-scaled GEMM's calls in scaled_mm.py): FP8 dequantization's GB/s and share of a
   streamed expert's launch on two real models' expert shapes, and a block-scaled FP8 GEMM's time and error.

Every record (records.py) has stage, status (ok / failed / timeout / skipped), run, device,
dry_run, seconds, versions and a one-line headline, plus `error` or `reason` when not ok; each
stage module's docstring lists its own numbers. They go to OUT/records.jsonl as each stage ends,
everything printed to OUT/gpu_check.log, and a table to the terminal last.
"""
