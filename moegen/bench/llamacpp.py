"""llama.cpp as the bench's CPU baseline: built once into the cache from the sources that the
`llama-cpp-python` sdist vendors, checkpoints converted once to GGUF F32 with its own converter, and
its two batch drivers run as a user runs them (`llama-batched-bench`, and `llama-server` with
continuous batching under one request per sequence), each timed from process start.

Two things the converter and the loader need for the DeepSeek-V2-Lite-like bench checkpoint: the
converter does not know its byte-level pre-tokenizer (forced to the default: prompts go as token ids,
so tokenization never runs), and llama.cpp reads a DeepSeek-V2 without q-LoRA as "Lite" only at 26-27
layers, so its q_lora_rank is overridden to 0 at load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

SDIST = "llama-cpp-python==0.3.36"
TARGETS = ("llama-server", "llama-batched-bench")


class Unavailable(RuntimeError):
    """llama.cpp can't be built or run here; says what is missing."""


@dataclass(frozen=True, slots=True)
class LlamaCpp:
    source: Path  # the vendored llama.cpp tree
    bin: Path  # where the built tools are


def build(cache: Path, say) -> LlamaCpp:
    """The built tools, building them first if the cache has none (pip download, cmake, a native build on every
    core). Raises Unavailable, naming what is missing, when there is no compiler, cmake or sdist."""
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if missing:
        raise Unavailable(f"llama.cpp can't be built here: no {' or '.join(missing)} on PATH (install cmake and a C++ "
                          f"compiler, e.g. `apt-get install cmake g++`)")
    root = cache / "llama.cpp" / SDIST.split("==")[1]
    built = LlamaCpp(next(root.glob("llama_cpp_python-*/vendor/llama.cpp"), root / "missing"), root / "build" / "bin")
    if all((built.bin / t).is_file() for t in TARGETS):
        return built
    root.mkdir(parents=True, exist_ok=True)
    if not built.source.is_dir():
        say(f"  downloading the {SDIST} sdist (llama.cpp's sources) ...")
        _run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", str(root)],
             root / "download.log", f"pip download {SDIST}")
        archive = next(root.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
        built = LlamaCpp(next(root.glob("llama_cpp_python-*/vendor/llama.cpp")), built.bin)
    log = root / "build.log"
    say(f"  building llama.cpp once ({', '.join(TARGETS)}; native, {os.cpu_count()} cores: minutes); log {log}")
    began = time.perf_counter()
    _run(["cmake", "-S", str(built.source), "-B", str(root / "build"), "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"], log,
         "cmake configure")
    _run(["cmake", "--build", str(root / "build"), "-j", str(os.cpu_count() or 1), "--target", *TARGETS], log,
         "cmake --build")
    say(f"  built llama.cpp in {time.perf_counter() - began:.0f}s")
    return built


GGUF_TYPES = {"float32": "f32", "bfloat16": "bf16"}  # moegen --dtype -> the converter's --outtype


def gguf(llama: LlamaCpp, model_dir: Path, cache: Path, say, outtype: str = "f32") -> Path:
    """model_dir converted to GGUF `outtype` (f32 or bf16) by llama.cpp's converter, once (cached under the
    checkpoint's name)."""
    out = cache / "llama.cpp" / "gguf" / f"{Path(model_dir).name}-{outtype}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    say(f"  converting {model_dir} to GGUF {outtype.upper()} ...")
    tmp = out.with_suffix(".tmp")
    _run([sys.executable, "-m", "moegen.bench.gguf_convert", str(llama.source), str(model_dir), "--outtype", outtype,
          "--outfile", str(tmp)], out.with_suffix(".log"), f"converting {model_dir}")
    tmp.replace(out)
    return out


def load_overrides(model_dir: Path) -> list[str]:
    """--override-kv flags a checkpoint needs at load (a DeepSeek-V2 without q-LoRA: q_lora_rank 0)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if cfg.get("model_type") == "deepseek_v2" and not cfg.get("q_lora_rank"):
        return ["--override-kv", "deepseek2.attention.q_lora_rank=int:0"]
    return []


def batched_bench(llama: LlamaCpp, model: Path, overrides: list[str], sequences: int, prompt_len: int,
                  new_tokens: int, threads: int) -> dict:
    """`llama-batched-bench` over `sequences` prompts of `prompt_len` tokens generating `new_tokens` each, timed
    from process start to exit; its own table row too."""
    ctx = sequences * (prompt_len + new_tokens) + 64
    command = [str(llama.bin / "llama-batched-bench"), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512",
               "-npp", str(prompt_len), "-ntg", str(new_tokens), "-npl", str(sequences), "-t", str(threads), *overrides]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    generated = sequences * new_tokens
    return {"engine": "llama.cpp batched-bench", "seconds": seconds, "generated": generated,
            "tok_s": generated / seconds, "table": parse_batched_bench(done.stdout + done.stderr)}


def parse_batched_bench(text: str) -> dict:
    """The last row of llama-batched-bench's table as {column: number}; {} when it printed none."""
    header, row = None, None
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if "PP" in cells and "TG" in cells:
            header = cells
        elif header and len(cells) == len(header) and all(re.fullmatch(r"[\d.]+", c) for c in cells):
            row = cells
    return {} if row is None else {h: float(v) for h, v in zip(header, row)}


def server(llama: LlamaCpp, model: Path, overrides: list[str], prompt_ids: list[list[int]], new_tokens: int,
           threads: int, log: Path) -> dict:
    """`llama-server` with a slot per request and continuous batching, every prompt sent at once (as token ids,
    greedy, EOS ignored); timed from the server's start to the last completion (its load included). Its log goes
    to `log` (a pipe nobody reads would fill and stall it)."""
    n = len(prompt_ids)
    ctx = n * (max(map(len, prompt_ids)) + new_tokens + 8)
    port = _free_port()
    command = [str(llama.bin / "llama-server"), "-m", str(model), "--parallel", str(n), "-cb", "-c", str(ctx), "-b",
               "2048", "-ub", "512", "-t", str(threads), "--host", "127.0.0.1", "--port", str(port), *overrides]
    url = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, proc, log)

        def complete(ids: list[int]) -> int:
            body = json.dumps({"prompt": ids, "n_predict": new_tokens, "ignore_eos": True, "temperature": 0.0,
                               "cache_prompt": False}).encode()
            request = urllib.request.Request(f"{url}/completion", body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=3600) as response:
                return int(json.loads(response.read())["tokens_predicted"])

        with ThreadPoolExecutor(n) as pool:
            generated = sum(pool.map(complete, prompt_ids))
        seconds = time.perf_counter() - start
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    return {"engine": f"llama.cpp server --parallel {n} -cb", "seconds": seconds, "generated": generated,
            "tok_s": generated / seconds}


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, limit_s: float = 600.0) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}) before it was ready; the end of {log}:\n"
                               f"{log.read_text(errors='replace')[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"llama-server at {url} was not ready after {limit_s:.0f}s")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], log: Path, what: str) -> None:
    with open(log, "a") as f:
        done = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        raise Unavailable(f"{what} failed ({done.returncode}); the end of {log}:\n{tail}")
