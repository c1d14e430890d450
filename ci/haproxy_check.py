#!/usr/bin/env python3
"""Sends connections through a load balancer in front of echod and checks, from echod's
banners, that every backend answered and that each saw the client's address (this script's
source address and port), not the balancer's. Every connection also echoes a message exactly.

Usage: haproxy_check.py --frontend HOST:PORT --source IP --backend SPEC [--backend SPEC ...]
"""

import argparse
import socket
import sys
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--frontend", required=True)
    parser.add_argument("--source", required=True, help="local address to connect from")
    parser.add_argument("--backend", action="append", required=True, help="a backend's listener spec")
    parser.add_argument("--connections", type=int, default=20)
    args = parser.parse_args()
    host, port = args.frontend.rsplit(":", 1)
    deadline = time.monotonic() + 30

    seen = {spec: 0 for spec in args.backend}
    for i in range(args.connections):
        # The frontend may take a moment to bind.
        while True:
            try:
                sock = socket.create_connection((host, int(port)), timeout=10, source_address=(args.source, 0))
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        with sock:
            client = "%s:%d" % sock.getsockname()[:2]
            reader = sock.makefile("rb")
            banner = reader.readline(4096).decode().rstrip("\n")
            name, _, claimed = banner.rpartition(" ")
            backend = next((spec for spec in args.backend if name.endswith("-" + spec)), None)
            if backend is None:
                fail(f"connection {i}: banner {banner!r} names none of the backends {args.backend}")
            if claimed != client:
                fail(f"connection {i}: echod saw client {claimed!r}, but the client is {client} (banner {banner!r})")
            message = b"through the balancer %d\n" % i
            sock.sendall(message)
            back = reader.read(len(message))
            if back != message:
                fail(f"connection {i}: echoed {back!r}, sent {message!r}")
            sock.shutdown(socket.SHUT_WR)
            if reader.read() != b"":
                fail(f"connection {i}: bytes after the echo")
            seen[backend] += 1
        print(f"  {i:2}: {banner}")
    missing = [spec for spec, n in seen.items() if n == 0]
    if missing:
        fail(f"backends that never answered: {missing}")
    print("haproxy: every backend answered (%s) and saw the client's own address" %
          ", ".join(f"{spec}: {n}" for spec, n in seen.items()))


def fail(message):
    print("haproxy check failed: " + message, file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
    main()
