"""A real HTTP server on 127.0.0.1 for download tests, with Range support and scripted faults."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Server:
    def __init__(self, files: dict[str, bytes], faults: list[str]):
        self.files = files
        # Consumed one per request: "500" or "503", "drop" (half the body, then close), "not http" (an answer that is no
        # HTTP), "chunked cut" (a chunked body cut short), "bad length" (a Content-Length that is no number), "ok".
        self.faults = list(faults)
        self.requests: list[dict] = []
        self.url = ""


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep test output clean
            pass

        def do_GET(self) -> None:
            fault = server.faults.pop(0) if server.faults else "ok"
            server.requests.append({"path": self.path, "range": self.headers.get("Range"), "fault": fault})
            body = server.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            if fault in ("500", "503"):
                self.send_error(int(fault))
                return
            if fault == "not http":
                self.wfile.write(b"HELLO THERE\r\n\r\n")
                return
            start = 0
            if self.headers.get("Range", "").startswith("bytes="):
                start = int(self.headers["Range"][6:].split("-")[0])
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
            else:
                self.send_response(200)
            payload = body[start:]
            if fault == "chunked cut":
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n" % len(payload) + payload[: len(payload) // 2])
                return
            self.send_header("Content-Length", "12 bytes" if fault == "bad length" else str(len(payload)))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            if fault == "drop":
                self.wfile.write(payload[: len(payload) // 2])
                self.wfile.flush()
                self.connection.close()
                return
            self.wfile.write(payload)

    return Handler


@contextmanager
def serve(files: dict[str, Path | bytes], faults: list[str] = ()) -> Iterator[Server]:
    contents = {f"/{name}": data if isinstance(data, bytes) else Path(data).read_bytes()
                for name, data in files.items()}
    server = Server(contents, list(faults))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(server))
    server.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()
