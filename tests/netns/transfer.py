"""A one-connection TCP transfer with a checksum, run inside a namespace.

  transfer.py serve ADDR PORT          accept one connection, print "<bytes> <sha256>"
  transfer.py send ADDR PORT SIZE [RATE]  send SIZE random bytes (at RATE bytes/s),
                                          print "<bytes> <sha256>" of what was sent

The sender never reconnects: if the tunnel path changes mid-transfer, the same
TCP connection has to carry on for the checksums to match.
"""

import hashlib
import os
import socket
import sys
import time


def serve(addr: str, port: int) -> None:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    srv = socket.socket(fam, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    print("listening", flush=True)
    srv.settimeout(60)
    conn, _ = srv.accept()
    conn.settimeout(60)
    h = hashlib.sha256()
    n = 0
    while True:
        chunk = conn.recv(65536)
        if not chunk:
            break
        h.update(chunk)
        n += len(chunk)
    print(n, h.hexdigest(), flush=True)


def send(addr: str, port: int, size: int, rate: float | None) -> None:
    fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
    c = socket.socket(fam, socket.SOCK_STREAM)
    c.settimeout(60)
    deadline = time.monotonic() + 30
    while True:
        try:
            c.connect((addr, port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            c.close()
            c = socket.socket(fam, socket.SOCK_STREAM)
            c.settimeout(60)
            time.sleep(0.2)
    h = hashlib.sha256()
    sent = 0
    start = time.monotonic()
    block = 16384
    while sent < size:
        data = os.urandom(min(block, size - sent))
        c.sendall(data)
        h.update(data)
        sent += len(data)
        if rate:
            ahead = sent / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
    c.shutdown(socket.SHUT_WR)
    c.recv(1)  # wait for the server to close: everything arrived
    print(sent, h.hexdigest(), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]))
    else:
        send(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]) if len(sys.argv) > 5 else None)
