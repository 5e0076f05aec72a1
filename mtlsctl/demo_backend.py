"""A tiny application for the demo and the tests: it echoes the X-Client-* headers nginx sets.

    python -m mtlsctl.demo_backend PORT

Answers every GET with the guide's line ("mTLS Authentication Successful! Client DN: ...") and then
one line per X-Client-* header it received (every occurrence, so a spoofed duplicate would show).
Binds 127.0.0.1 only.
"""

from __future__ import annotations

import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HEADERS = ("X-Client-DN", "X-Client-Verify", "X-Client-Fingerprint", "X-Client-Serial")


class EchoHandler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        dn = self.headers.get("X-Client-DN") or "(none)"
        lines = [f"mTLS Authentication Successful! Client DN: {dn}"]
        for name in HEADERS:
            for value in self.headers.get_all(name) or []:
                lines.append(f"{name}: {value}")
        body = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


def main() -> None:
    port = int(sys.argv[1])
    ThreadingHTTPServer(("127.0.0.1", port), EchoHandler).serve_forever()


if __name__ == "__main__":
    main()
