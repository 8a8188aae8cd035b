"""Screenshots of a real offload trace in the bundled Perfetto UI, for docs/tuning.md.

    python -m tools.trace_screenshots [--out docs/img] [--trace FILE] [--keep-trace FILE]

1. Records a trace the way traces/example-offload.pftrace was made (traces/README.md): a random-weight
   Mixtral-like checkpoint (`moegen make-model --family mixtral --size small --seed 0`, the demo
   checkpoint's recipe), the first 12 prompts of examples/prompts.jsonl, 16 new tokens, the cpu backend
   in float32 under `--gpu-memory 100MiB --sim-link-gbps 4 --batch-size 8 --attn-micro-batch 4`, so
   (with this budget) the last layer's experts stream through two slots over a simulated 4 GB/s link. `--no-plan`: the
   planner's choices depend on this machine's calibration, the screenshots should not. (`--trace FILE`
   skips this and shoots an existing trace.)
2. Opens it with `moegen trace view`'s server in headless Chromium at a fixed 1600x900 viewport,
   expands the track groups, drops the `System` group and the counter tracks, and saves:
   - trace-overlap.png: two consecutive decode steps, the compute stream (and its lanes) above the
     copy streams, so the weight copies are seen running under compute;
   - trace-step.png: one step's streamed-expert phase zoomed in, one streamed expert selected, so its
     args (layer, expert, tokens, flops) show in the details panel and the flow arrow from the
     `copy expert[l][e]` that fed it is drawn.

Needs Chromium (`apt-get install chromium`) and `websocket-client` (a dev dependency). Takes about
15 s on 2 cores (the traced run is ~9 s of it)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "img"
VIEWPORT = (1600, 900)
PROMPTS = 12
MAKE_MODEL = ["--family", "mixtral", "--size", "small", "--seed", "0"]
SERVE = ["--max-new-tokens", "16", "--seed", "0", "--device", "cpu", "--dtype", "float32", "--gpu-memory", "100MiB",
         "--sim-link-gbps", "4", "--batch-size", "8", "--attn-micro-batch", "4", "--no-plan"]
FIRST_STEP = 8  # the pair of decode steps shown starts here or later: past the first steps' one-time costs
OVERLAP, STEP = "trace-overlap.png", "trace-step.png"


def moegen(*args: str) -> None:
    """`python -m moegen ARGS` from the repository, its output kept unless it fails."""
    done = subprocess.run([sys.executable, "-m", "moegen", *args], cwd=REPO, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"moegen {' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def record_trace(workdir: Path) -> Path:
    """A real traced offload run (see the module's docstring) into workdir/run.pftrace."""
    model, dataset, trace = workdir / "model", workdir / "prompts.jsonl", workdir / "run.pftrace"
    moegen("make-model", str(model), *MAKE_MODEL, "--overwrite")
    lines = (REPO / "examples" / "prompts.jsonl").read_text().splitlines(keepends=True)[:PROMPTS]
    dataset.write_text("".join(lines))
    moegen("serve-offline", str(model), "--dataset", str(dataset), "--output", str(workdir / "results.jsonl"),
           "--overwrite", *SERVE, "--trace", str(trace))
    return trace


# --- the UI -------------------------------------------------------------------------------------------

def rows(browser, sql: str) -> list[dict]:
    """Rows of a query through the UI's own trace processor, every value as a string (or None)."""
    js = """(async () => {
      const r = await app.trace.engine.query(%s);
      const out = [];
      for (const it = r.iter({}); it.valid(); it.next()) {
        const row = {};
        for (const c of r.columns()) row[c] = it.get(c) === null ? null : String(it.get(c));
        out.push(row);
      }
      return out;
    })()""" % json.dumps(sql)
    return browser.evaluate(js)


BUSY = ("JSON.stringify({loading: app.isLoadingTrace, queries: app.trace.engine.numRequestsPending, "
        "redraws: raf.hasPendingRedraws, animations: document.getAnimations().filter(a => a.playState === 'running').length})")


def settle(browser, timeout_s: float = 20) -> None:
    """Redraw, then wait until the UI is idle. The UI's own `waitForPerfettoIdle` (no queries, redraws,
    tasks or animations for 100 ms, seen from requestIdleCallback) now and then never resolves on a
    busy machine though nothing is pending; after 3 s the indicators it can see from the page decide."""
    browser.evaluate("raf.scheduleFullRedraw()")
    if browser.evaluate("Promise.race([waitForPerfettoIdle().then(() => true), "
                        "new Promise(done => setTimeout(() => done(false), 3000))])"):
        return
    deadline = time.monotonic() + timeout_s
    while True:
        busy = json.loads(browser.evaluate(BUSY))
        if not any(busy.values()):
            browser.evaluate("new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")
            return
        if time.monotonic() > deadline:
            print(f"trace_screenshots: the UI still busy after {timeout_s:.0f}s ({busy}); going on", file=sys.stderr)
            return
        time.sleep(0.2)


def prepare_tracks(browser) -> None:
    """Every group expanded; the `System` group (clock snapshots) and the counter tracks removed (they
    are scaled to the whole run, flat within a decode step), so the event loop, compute and copy tracks
    fill the view."""
    settle(browser)
    browser.wait_for("app.trace.workspace.flatTracks.some(t => t.name === 'compute stream')", 30,
                     "the trace's tracks never appeared in the UI")
    counters = [r["name"] for r in rows(browser, "select distinct name from counter_track")]
    browser.evaluate("""(() => {
      const drop = new Set(%s);
      for (const node of app.trace.workspace.flatTracks) {
        if (node.name === 'System' || drop.has(node.name)) node.remove();
        else node.expand();
      }
    })()""" % json.dumps(counters))
    settle(browser)


def remove_tracks_empty_in(browser, span: Span) -> None:
    """Drop the slice tracks with nothing in `span` (room for the details drawer)."""
    busy = [r["name"] for r in rows(browser, f"select distinct t.name from slice s join track t on s.track_id = t.id "
                                              f"where s.ts < {span.end} and s.ts + s.dur > {span.start}")]
    browser.evaluate("""(() => {
      const busy = new Set(%s);
      for (const node of app.trace.workspace.flatTracks)
        if (!node.hasChildren && !busy.has(node.name)) node.remove();
    })()""" % json.dumps(busy))
    settle(browser)


def drawer_below_tracks(browser, gap: int = 12) -> None:
    """Drag the details drawer's handle up to just below the last track, so the selection's details
    (args, flows) get the rest of the viewport."""
    handle = browser.evaluate("(() => { const r = document.querySelector('.pf-split-panel__handle')"
                              ".getBoundingClientRect(); return [r.top, r.height]; })()")
    last = browser.evaluate("Math.max(...Array.from(document.querySelectorAll('.pf-track__children .pf-track'))"
                            ".map(e => e.getBoundingClientRect().bottom))")
    x, y, target = browser.evaluate("window.innerWidth") // 2, handle[0] + handle[1] / 2, last + gap + handle[1] / 2
    browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
    browser.call("Input.dispatchMouseEvent", type="mousePressed", x=x, y=y, button="left", buttons=1, clickCount=1)
    for i in range(1, 11):
        browser.call("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y + (target - y) * i / 10,
                     button="left", buttons=1)
    browser.call("Input.dispatchMouseEvent", type="mouseReleased", x=x, y=target, button="left", buttons=0,
                 clickCount=1)
    settle(browser)


@dataclass
class Span:
    start: int
    end: int


def slices(browser, where: str) -> list[dict]:
    return rows(browser, "select s.id, s.ts, s.dur, s.name, t.name as track from slice s join track t "
                         f"on s.track_id = t.id where {where} order by s.ts")


def decode_pair(steps: list[dict]) -> tuple[dict, dict]:
    """Two consecutive decode-only steps, the first at FIRST_STEP or later where there are such."""
    def number(s):
        m = re.match(r"step (\d+)", s["name"])
        return int(m.group(1)) if m else -1

    pairs = [(a, b) for a, b in zip(steps, steps[1:])
             if a["name"].endswith("(decode)") and b["name"].endswith("(decode)") and number(b) == number(a) + 1]
    if not pairs:
        if len(steps) < 2:
            raise RuntimeError(f"the trace has {len(steps)} step(s) on its event loop track; need 2")
        return steps[0], steps[1]
    late = [p for p in pairs if number(p[0]) >= FIRST_STEP]
    return (late or pairs)[0]


def set_window(browser, span: Span) -> None:
    browser.evaluate(f"app.trace.timeline.setViewportTime({span.start}n, {span.end}n)")


def padded(start: int, end: int, share: float) -> Span:
    pad = int((end - start) * share)
    return Span(start - pad, end + pad)


def streamed_expert(browser, step: dict) -> tuple[dict, Span] | None:
    """In `step`: the expert fed by a weight copy made during the step (the pipelined part of the
    streamed layer), the middle one of those, and the span of those copies and computes."""
    start, end = int(step["ts"]), int(step["ts"]) + int(step["dur"])
    fed = rows(browser, f"""
      select c.id, c.ts, c.dur, c.name, a.ts as copy_ts from flow f
      join slice a on a.id = f.slice_out join slice c on c.id = f.slice_in join track tc on c.track_id = tc.id
      where a.name like 'copy expert%' and tc.name like 'compute stream%'
        and a.ts >= {start} and c.ts + c.dur <= {end} order by c.ts""")
    if not fed:
        return None
    chosen = fed[len(fed) // 2]
    span = padded(min(int(r["copy_ts"]) for r in fed), max(int(r["ts"]) + int(r["dur"]) for r in fed), 0.08)
    return chosen, span


def shoot(trace: Path, out: Path, viewport: tuple[int, int] = VIEWPORT) -> list[Path]:
    """Both screenshots of `trace` into the folder `out`; their paths."""
    from moegen.trace.view import serve_in_thread
    from tools.browser import Browser, open_trace

    out.mkdir(parents=True, exist_ok=True)
    server, url = serve_in_thread(trace)
    profile = Path(tempfile.mkdtemp(prefix="moegen-chromium-"))
    browser = None
    try:
        browser = Browser(profile, viewport=viewport)
        open_trace(browser, url)
        prepare_tracks(browser)
        steps = slices(browser, "t.name = 'event loop' and s.name like 'step %'")
        first, second = decode_pair(steps)

        pair = Span(int(first["ts"]), int(second["ts"]) + int(second["dur"]))
        set_window(browser, padded(pair.start, pair.end, 0.015))
        settle(browser)
        overlap = browser.screenshot(out / OVERLAP)

        found = streamed_expert(browser, second) or streamed_expert(browser, first)
        if found is None:  # nothing streamed: the longest expert of the step, the whole step in view
            experts = slices(browser, f"t.name like 'compute stream%' and s.name like 'expert%' "
                                      f"and s.ts >= {second['ts']} and s.ts < {int(second['ts']) + int(second['dur'])}")
            if not experts:
                raise RuntimeError(f"no expert slices in {second['name']}")
            chosen = max(experts, key=lambda r: int(r["dur"]))
            span = padded(int(second["ts"]), int(second["ts"]) + int(second["dur"]), 0.01)
        else:
            chosen, span = found
        browser.evaluate(f"app.trace.selection.selectSqlEvent('slice', {chosen['id']}, "
                         "{switchToCurrentSelectionTab: true, scrollToSelection: false})")
        settle(browser)
        remove_tracks_empty_in(browser, span)
        drawer_below_tracks(browser)
        set_window(browser, span)
        settle(browser)
        step = browser.screenshot(out / STEP)
        return [overlap, step]
    finally:
        if browser is not None:
            browser.close()
        server.shutdown()
        server.server_close()
        shutil.rmtree(profile, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"folder for the PNGs [default: {OUT.relative_to(REPO)}]")
    parser.add_argument("--trace", type=Path, help="shoot this trace instead of recording one")
    parser.add_argument("--keep-trace", type=Path, help="also copy the recorded trace here")
    args = parser.parse_args(argv)

    from tools.browser import CHROMIUM, INSTALL_HINT

    if CHROMIUM is None:
        print(f"trace_screenshots: no Chromium on PATH; {INSTALL_HINT}", file=sys.stderr)
        return 1
    try:
        import websocket  # noqa: F401
    except ImportError:
        print("trace_screenshots: needs websocket-client (pip install -e '.[dev]')", file=sys.stderr)
        return 1
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="moegen-screenshots-") as work:
        trace = args.trace
        if trace is None:
            print("trace_screenshots: recording a traced offload run ...", file=sys.stderr)
            trace = record_trace(Path(work))
            print(f"trace_screenshots: recorded {trace.stat().st_size / 1024:.0f} KiB in "
                  f"{time.monotonic() - started:.1f}s", file=sys.stderr)
            if args.keep_trace:
                args.keep_trace.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(trace, args.keep_trace)
                print(f"wrote {args.keep_trace}")
        for path in shoot(trace, args.out):
            print(f"wrote {path}")
    print(f"trace_screenshots: done in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
