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
    """The demo checkpoint's directory, generated on first use."""
    return cached_checkpoint(DEMO_FAMILY, DEMO_SIZE, "demo")


def cached_checkpoint(family: str, size: str, purpose: str) -> Path:
    """A random `family` checkpoint of `size` in the cache, generated on first use (built aside, then
    renamed into place, so an interrupted first run leaves nothing half-written)."""
    target = cache_dir() / f"{purpose}-{family}-{size}"
    if (target / "config.json").is_file():
        return target
    from moegen.checkpoints.make import make_model

    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"moegen: making the {purpose} checkpoint ({family}-like, {size}, random weights) in {target} — once",
          file=sys.stderr)
    scratch = Path(tempfile.mkdtemp(prefix=f".{purpose}-", dir=target.parent))
    try:
        make_model(scratch, family, size, overwrite=True)
        if target.exists():
            shutil.rmtree(target)
        scratch.chmod(0o755)  # mkdtemp made it private
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target
