"""moegen takes configs and tokenizers from transformers, nothing else: no model code, no generation code."""

from __future__ import annotations

import ast
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import moegen

PACKAGE = Path(moegen.__file__).resolve().parent
ALLOWED = {"AutoConfig", "AutoTokenizer"}  # `from transformers import <these>` is all moegen may write


def transformers_imports(source: str, filename: str) -> list[str]:
    """'file:line: statement' for every import of transformers in `source` that isn't an allowed one."""
    bad = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "transformers" or alias.name.startswith("transformers."):
                    bad.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and (module == "transformers" or module.startswith("transformers.")):
                names = [a.name for a in node.names]
                if module != "transformers" or not set(names) <= ALLOWED:
                    bad.append(f"{where}: from {module} import {', '.join(names)}")
        elif isinstance(node, ast.Call):  # importlib.import_module("transformers...") / __import__("transformers...")
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("transformers"):
                    bad.append(f"{where}: {name}({arg.value!r})")
    return bad


def test_scanner_flags_forbidden_imports():
    """The scanner itself: it must catch each way of reaching transformers' model code."""
    source = textwrap.dedent("""
        from transformers import AutoConfig, AutoTokenizer
        from transformers import AutoModelForCausalLM
        from transformers import AutoConfig as C, PreTrainedModel
        import transformers
        import transformers.models.mixtral.modeling_mixtral as mm
        from transformers.models.mixtral import modeling_mixtral
        from transformers.generation import GenerationMixin
        import importlib
        importlib.import_module("transformers.modeling_utils")
        def f():
            from transformers import AutoTokenizer
    """)
    bad = transformers_imports(source, "x.py")
    assert sorted(int(b.split(":")[1]) for b in bad) == [3, 4, 5, 6, 7, 8, 10], bad


def test_static_only_autoconfig_and_autotokenizer():
    # moegen/bench/ runs transformers' generate as the peer it measures against; the engine never does.
    files = sorted(p for p in PACKAGE.rglob("*.py") if PACKAGE / "bench" not in p.parents)
    assert len(files) >= 10 and PACKAGE / "models" / "loader.py" in files
    # Scanned in a fresh interpreter: Python 3.11's AST validator keeps one recursion counter for all threads, so an
    # ast.parse here can fail ("AST constructor recursion depth mismatch") while a thread an earlier test left
    # running compiles an import.
    scan = (f"import ast, json, sys\nALLOWED = set({sorted(ALLOWED)!r})\n" + inspect.getsource(transformers_imports)
            + "\nbad = []\nfor name in sys.argv[1:]:\n    bad += transformers_imports(open(name).read(), name)\n"
            + "print(json.dumps(bad))\n")
    done = subprocess.run([sys.executable, "-c", scan, *(str(p.relative_to(PACKAGE.parent)) for p in files)],
                          capture_output=True, text=True, cwd=PACKAGE.parent, check=True)
    bad = json.loads(done.stdout)
    assert not bad, "moegen may only `from transformers import AutoConfig/AutoTokenizer`:\n" + "\n".join(bad)


# A module counts as transformers' model or generation machinery when it is one of these.
def _forbidden(name: str) -> bool:
    return ((name.startswith("transformers.models.") and "modeling_" in name)
            or name == "transformers.modeling_utils"
            or name == "transformers.generation" or name.startswith("transformers.generation."))


# transformers' own `configuration_utils` imports `transformers.generation.configuration_utils`
# (GenerationConfig, a plain dataclass), and AutoConfig.from_pretrained imports
# `transformers.models.auto.modeling_auto` (the architecture-name tables). Those two come with the
# entry points moegen is allowed; the probe measures them in a process that uses nothing else.
BASELINE_PROBE = """
import json, sys
from transformers import AutoConfig, AutoTokenizer
AutoConfig.from_pretrained(sys.argv[1], local_files_only=True)
AutoTokenizer.from_pretrained(sys.argv[1], local_files_only=True)
print(json.dumps(sorted(m for m in sys.modules if m.startswith("transformers"))))
"""

MOEGEN_PROBE = """
import json, sys
def snapshot():
    return sorted(m for m in sys.modules if m.startswith("transformers"))
from moegen.models.loader import load_checkpoint
from moegen.models.reference import ReferenceModel
cfg, w, _ = load_checkpoint(sys.argv[1])
gens = ReferenceModel(cfg, w).generate([[1, 5, 9]], 3)
assert len(gens[0].token_ids) == 3
after_reference = snapshot()
from moegen.generate import SamplingOptions, generate
completions, _ = generate(sys.argv[1], ["hello"], SamplingOptions(max_new_tokens=2))
assert completions[0].token_ids
after_generate = snapshot()
# Control: transformers' own model loading does pull in the modules the test forbids.
import torch
from transformers import AutoModelForCausalLM
AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
print(json.dumps({"reference": after_reference, "generate": after_generate, "control": snapshot()}))
"""


def _run(probe: str, model_dir: Path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", probe, str(model_dir)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from moegen.checkpoints.make import make_model

    return make_model(tmp_path_factory.mktemp("imports") / "mixtral", "mixtral", "tiny").path


def test_dynamic_no_model_or_generation_code(tiny_dir):
    seen = _run(MOEGEN_PROBE, tiny_dir)
    baseline = {m for m in _run(BASELINE_PROBE, tiny_dir) if _forbidden(m)}
    # What AutoConfig/AutoTokenizer import by themselves, and nothing that builds or runs a model.
    assert baseline <= {"transformers.generation", "transformers.generation.configuration_utils",
                        "transformers.models.auto.modeling_auto"}, baseline
    for stage in ("reference", "generate"):
        forbidden = {m for m in seen[stage] if _forbidden(m)}
        assert forbidden <= baseline, f"after {stage}: moegen imported {sorted(forbidden - baseline)}"
        assert "transformers.modeling_utils" not in seen[stage]
        assert not any(m.startswith("transformers.models.mixtral.modeling_") for m in seen[stage])
        assert "transformers.generation.utils" not in seen[stage]
    # The control shows these checks can see model code when it is there.
    control = set(seen["control"])
    assert "transformers.modeling_utils" in control and "transformers.models.mixtral.modeling_mixtral" in control
    assert {m for m in control if _forbidden(m)} - baseline
