"""`python -m tools.gpu_check ...` (what tools/gpu_check.sh runs): the check, or --prepare."""

from __future__ import annotations

import sys

from tools.gpu_check.options import from_args, parser
from tools.gpu_check.stages import resolve


def main(argv: list[str]) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.prepare:
        from tools.gpu_check.prepare import prepare

        prepare(args.prepared.resolve())
        return 0
    try:
        stages = resolve(args.stages)
        timeouts = {}
        for item in args.timeout:
            name, _, seconds = item.partition("=")
            timeouts[name.strip()] = float(seconds)
            resolve(name)  # a typo fails here, not silently
    except ValueError as exc:
        p.error(f"{exc} (--timeout takes STAGE=SECONDS, e.g. --timeout parity=120)")
    from tools.gpu_check.runner import run_all

    rows = run_all(from_args(args, stages, timeouts))
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
