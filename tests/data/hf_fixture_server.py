#!/usr/bin/env python3
"""A stand-in for the Hugging Face Hub's dataset API, for download tests (stdlib only).

Serves the datasets stored under ROOT/<owner>/<name>/:
  GET /api/datasets/<owner>/<name>/tree/<rev>?recursive=true   the listing (any revision)
  GET /datasets/<owner>/<name>/resolve/<rev>/<path>            the file, with Range support

and can misbehave on purpose, per file (PATH is the file's path inside its repository):
  --break-path PATH --break-after N --break-times K   the first K responses for PATH
        announce the full Content-Length but close the connection after N body bytes
  --ignore-range-path PATH   answers 200 with the whole file even to Range requests
  --corrupt-path PATH        flips a byte of the body (the listing keeps the true sha256)
  --redirect                 resolve/ answers 302 to /cdn/..., as the Hub does for LFS
  --page-size N              pages the listing with Link: <...>; rel="next"
  --loop-pages               with --page-size: the last page links back to the first
  --lfs-min-size N           files smaller than N bytes have no "lfs" member (plain git)
  --inject-path PATH         adds a listing entry PATH (for unsafe-path tests)

The chosen port (the server binds 127.0.0.1 port 0) is written to --port-file once the
server listens. Each request is logged as one line "METHOD PATH RANGE" ('-' without a
Range header), flushed, to --log FILE or else stdout.
"""

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", required=True)
    p.add_argument("--port-file", required=True)
    p.add_argument("--break-path", action="append", default=[])
    p.add_argument("--break-after", type=int, default=0)
    p.add_argument("--break-times", type=int, default=1)
    p.add_argument("--ignore-range-path", action="append", default=[])
    p.add_argument("--corrupt-path", action="append", default=[])
    p.add_argument("--redirect", action="store_true")
    p.add_argument("--page-size", type=int, default=0)
    p.add_argument("--loop-pages", action="store_true")
    p.add_argument("--lfs-min-size", type=int, default=0)
    p.add_argument("--inject-path", action="append", default=[])
    p.add_argument("--log")
    return p.parse_args()


ARGS = parse_args()
LOCK = threading.Lock()
BREAKS_LEFT = {path: ARGS.break_times for path in ARGS.break_path}
LOG = open(ARGS.log, "a", buffering=1) if ARGS.log else sys.stdout


def log(line):
    with LOCK:
        LOG.write(line + "\n")
        LOG.flush()


def repo_dir(owner, name):
    d = os.path.join(ARGS.root, owner, name)
    return d if os.path.isdir(d) else None


def listing(base):
    entries = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, base)
        if rel_dir != ".":
            entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": rel_dir})
        for f in sorted(filenames):
            rel = f if rel_dir == "." else rel_dir + "/" + f
            with open(os.path.join(dirpath, f), "rb") as fh:
                data = fh.read()
            entry = {"type": "file", "size": len(data), "path": rel,
                     "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
            if len(data) >= ARGS.lfs_min_size:
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
    for p in ARGS.inject_path:
        entries.append({"type": "file", "size": 1, "path": p, "oid": "1" * 40})
    return entries


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # requests are logged by log() instead
        pass

    def send_bytes(self, status, body, content_type="application/octet-stream", headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self):
        self.do_GET()

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        log(f"{self.command} {urllib.parse.unquote(self.path)} {self.headers.get('Range', '-')}")
        # Split before unescaping: a revision like refs%2Fconvert%2Fparquet is one segment.
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        # /api/datasets/<owner>/<name>/tree/<rev...>
        if len(parts) >= 6 and parts[:2] == ["api", "datasets"] and parts[4] == "tree":
            return self.serve_listing(parts[2], parts[3], url.path, urllib.parse.parse_qs(url.query))
        # /datasets/<owner>/<name>/resolve/<rev>/<path...>  (rev is one URL-escaped segment)
        if len(parts) >= 6 and parts[0] == "datasets" and parts[3] == "resolve":
            if ARGS.redirect:
                target = "/cdn/" + "/".join(urllib.parse.quote(p, safe="") for p in parts[1:3] + parts[5:])
                return self.send_bytes(302, b"redirecting\n", "text/plain", [("Location", target)])
            return self.serve_file(parts[1], parts[2], "/".join(parts[5:]))
        # /cdn/<owner>/<name>/<path...>
        if len(parts) >= 4 and parts[0] == "cdn":
            return self.serve_file(parts[1], parts[2], "/".join(parts[3:]))
        self.send_bytes(404, b'{"error": "no such route"}', "application/json")

    def serve_listing(self, owner, name, url_path, query):
        base = repo_dir(owner, name)
        if base is None:
            return self.send_bytes(404, b'{"error": "Repository not found"}', "application/json")
        entries = listing(base)
        headers = []
        if ARGS.page_size > 0:
            start = int(query.get("cursor", ["0"])[0])
            more = start + ARGS.page_size < len(entries)
            if more or ARGS.loop_pages:
                cursor = start + ARGS.page_size if more else 0
                next_url = f"http://{self.headers['Host']}{url_path}?recursive=true&cursor={cursor}"
                headers.append(("Link", f'<{next_url}>; rel="next"'))
            entries = entries[start:start + ARGS.page_size]
        self.send_bytes(200, json.dumps(entries).encode(), "application/json", headers)

    def serve_file(self, owner, name, rel):
        base = repo_dir(owner, name)
        full = os.path.join(base, rel) if base else None
        if full is None or ".." in rel.split("/") or not os.path.isfile(full):
            return self.send_bytes(404, b"Entry not found", "text/plain")
        with open(full, "rb") as fh:
            data = bytearray(fh.read())
        if rel in ARGS.corrupt_path and data:
            data[len(data) // 2] ^= 0xFF
        size = len(data)
        status, start, end = 200, 0, size - 1
        rng = self.headers.get("Range")
        if rng and rng.startswith("bytes=") and rel not in ARGS.ignore_range_path:
            first, _, last = rng[6:].partition("-")
            start = int(first)
            end = min(int(last), size - 1) if last else size - 1
            if start >= size:
                return self.send_bytes(416, b"", "text/plain", [("Content-Range", f"bytes */{size}")])
            status = 206
        body = bytes(data[start:end + 1])
        headers = [("Content-Range", f"bytes {start}-{end}/{size}")] if status == 206 else []
        with LOCK:
            broken = BREAKS_LEFT.get(rel, 0) > 0
            if broken:
                BREAKS_LEFT[rel] -= 1
        if not broken or self.command == "HEAD":
            return self.send_bytes(status, body, headers=headers)
        # Full Content-Length, then only part of the body, then the connection drops.
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body[:ARGS.break_after])
        self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def main():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    tmp = ARGS.port_file + ".tmp"
    with open(tmp, "w") as f:
        f.write(str(server.server_address[1]))
    os.replace(tmp, ARGS.port_file)  # readers never see a half-written port
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
