"""app.py served on loopback for the benchmarks that drive it (bench_app, browser_check)."""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(index: str, port: int) -> subprocess.Popen:
    """app.py on loopback, once it listens; its output is read on (shown until then, kept in `server.output`), so it
    never blocks on a full pipe."""
    server = subprocess.Popen([sys.executable, "app.py", "--index", index, "--port", str(port)], cwd=ROOT,
                              env=os.environ | {"HF_HUB_OFFLINE": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    server.output = []
    for line in server.stdout:
        print(line, end="")
        server.output.append(line)
        if "Running on local URL" in line:
            threading.Thread(target=lambda: server.output.extend(server.stdout), daemon=True).start()
            return server
    raise SystemExit("app.py exited before serving")
