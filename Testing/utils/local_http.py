"""A local HTTP server for download tests (checkpoints, interrupted writes): no network needed."""

import contextlib
import http.server
import threading


@contextlib.contextmanager
def serve(handler):
    """Serve ``handler`` (a ``BaseHTTPRequestHandler`` class) on a free local port; yields its base URL."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
