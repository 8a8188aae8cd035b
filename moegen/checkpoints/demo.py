"""The demo checkpoint the main job uses when no model is given: made once, kept in the cache."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

DEMO_FAMILY, DEMO_SIZE = "mixtral", "small"


def cache_dir() -> Path:
    """$MOEGEN_CACHE, else $XDG_CACHE_HOME/moegen, else ~/.cache/moegen."""
    if os.environ.get("MOEGEN_CACHE"):
        return Path(os.environ["MOEGEN_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moegen"


def demo_model_dir() -> Path:
    """The demo checkpoint's directory, generated on first use (built aside, then renamed into place,
    so an interrupted first run leaves nothing half-written)."""
    target = cache_dir() / f"demo-{DEMO_FAMILY}-{DEMO_SIZE}"
    if (target / "config.json").is_file():
        return target
    from moegen.checkpoints.make import make_model

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"moegen: no model given; making the demo checkpoint ({DEMO_FAMILY}-like, {DEMO_SIZE}, random weights) "
          f"in {target} — once", file=sys.stderr)
    scratch = Path(tempfile.mkdtemp(prefix=".demo-", dir=target.parent))
    try:
        make_model(scratch, DEMO_FAMILY, DEMO_SIZE, overwrite=True)
        if target.exists():
            shutil.rmtree(target)
        scratch.chmod(0o755)  # mkdtemp made it private
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
