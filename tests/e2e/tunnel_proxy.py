#!/usr/bin/env python3
"""A plain CONNECT tunnel that stands in for regcache to self-test the harness.

    tunnel_proxy.py --listen 127.0.0.1:PORT --resolve HOST=ADDR:PORT [--resolve ...]
                    [--ca-file PEM]

It answers CONNECT HOST:PORT by connecting to the --resolve address for HOST
(refusing any other host, so nothing leaves loopback) and relaying bytes
untouched; clients then see the upstream's own certificate. GET /healthz
answers 200 and GET /ca.crt returns --ca-file. run.sh uses it when
E2E_PROXY=tunnel to check the registry, clients and trust set-up without the
regcache binary; checks that only make sense for an intercepting proxy are
skipped in that mode.
"""

import argparse
import asyncio
import sys


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


async def read_head(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    return method, target


def respond(writer, status, body=b"", ctype="text/plain"):
    writer.write(
        f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n".encode() + body
    )


async def handle(reader, writer, args):
    try:
        method, target = await read_head(reader)
    except Exception:
        writer.close()
        return
    if method == "CONNECT":
        host, _, port = target.rpartition(":")
        dest = args.resolve.get(host.lower())
        if dest is None:
            respond(writer, "403 Forbidden", f"no --resolve entry for {host}\n".encode())
            await writer.drain()
            writer.close()
            return
        daddr, _, dport = dest.rpartition(":")
        try:
            ur, uw = await asyncio.open_connection(daddr, int(dport or port))
        except OSError as e:
            respond(writer, "502 Bad Gateway", f"{e}\n".encode())
            await writer.drain()
            writer.close()
            return
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        await writer.drain()
        print(f"tunnel CONNECT {target} -> {dest}", file=sys.stderr, flush=True)
        await asyncio.gather(pipe(reader, uw), pipe(ur, writer))
        return
    if method == "GET" and target == "/healthz":
        respond(writer, "200 OK", b"ok\n")
    elif method == "GET" and target == "/ca.crt" and args.ca_file:
        with open(args.ca_file, "rb") as f:
            respond(writer, "200 OK", f.read(), "application/x-pem-file")
    else:
        respond(writer, "404 Not Found", b"not found\n")
    await writer.drain()
    writer.close()


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--listen", required=True)
    p.add_argument("--resolve", action="append", default=[])
    p.add_argument("--ca-file")
    args = p.parse_args()
    args.resolve = dict(r.lower().split("=", 1) for r in args.resolve)
    host, _, port = args.listen.rpartition(":")
    server = await asyncio.start_server(lambda r, w: handle(r, w, args), host, int(port))
    print(f"tunnel proxy listening on {args.listen}", file=sys.stderr, flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
