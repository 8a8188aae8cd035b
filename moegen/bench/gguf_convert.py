"""`python -m moegen.bench.gguf_convert LLAMA_CPP_DIR MODEL_DIR [converter flags]`: llama.cpp's own
convert_hf_to_gguf.py, run with one change: a BPE pre-tokenizer it does not recognize (the bench
checkpoints' byte-level one) is taken as its default instead of failing. The bench sends prompts as token
ids, so llama.cpp never tokenizes and the choice changes nothing it computes."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise SystemExit("usage: python -m moegen.bench.gguf_convert LLAMA_CPP_DIR MODEL_DIR [convert_hf_to_gguf flags]")
    root = Path(argv[0])
    script = root / "convert_hf_to_gguf.py"
    if not script.is_file():
        raise SystemExit(f"{root}: no convert_hf_to_gguf.py there; pass the llama.cpp source tree")
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    import conversion.base as base  # llama.cpp's converter package, from the tree just put on the path

    recognized = base.TextModel.get_vocab_base_pre

    def pre_tokenizer(self, tokenizer) -> str:
        try:
            return recognized(self, tokenizer)
        except NotImplementedError:
            return "default"

    base.TextModel.get_vocab_base_pre = pre_tokenizer
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
