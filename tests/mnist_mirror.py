"""A real MNIST download source on loopback: the four .gz files torchvision fetches, gzipped from the shared
raw files, served by http.server in a thread, with a log of every GET.

torchvision checks each downloaded .gz against the md5 in `MNIST.resources` (the official files'); ours are
other bytes (another gzip), so a test that wants the download to succeed points `resources` at our md5s.
"""
from __future__ import annotations

import gzip
import hashlib
import threading
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def build_gz(raw_dir: Path, out: Path) -> list[tuple[str, str]]:
    """gzip each raw MNIST file into `out`; returns torchvision-style resources [(name.gz, md5)]."""
    out.mkdir(parents=True, exist_ok=True)
    resources = []
    for name in FILES:
        data = gzip.compress((raw_dir / name).read_bytes(), compresslevel=1, mtime=0)
        (out / f"{name}.gz").write_bytes(data)
        resources.append((f"{name}.gz", hashlib.md5(data).hexdigest()))
    return resources


@contextmanager
def serve(folder: Path):
    """Serve `folder` on 127.0.0.1; yields (base URL ending in '/', paths downloaded). torchvision looks for a
    redirect with a GET carrying a `Method: HEAD` header before each download; those are not counted."""
    requests: list[str] = []

    class Handler(SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Method") != "HEAD":
                requests.append(self.path)
            super().do_GET()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", requests
    finally:
        server.shutdown()
        server.server_close()
