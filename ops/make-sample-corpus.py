#!/usr/bin/env python3
"""Rebuilds data/sample/sample.jsonl.zst, the bundled sample corpus, from Debian packages.

The corpus is two public-domain English texts as Debian ships them for dictd:
  dict-jargon  The Jargon File 4.4.7 (Eric S. Raymond et al., public domain)
  dict-devil   The Devil's Dictionary (Ambrose Bierce, 1911; copyright expired)
One RedPajama-format JSON line per dictionary entry:
  {"text": "...", "meta": {"source": ..., "title": ..., "licence": "public domain"}}

Usage: ops/make-sample-corpus.py [--out data/sample/sample.jsonl.zst]
Needs apt-get (to download the two .deb files), dpkg-deb and zstd.
"""
import argparse, gzip, json, os, subprocess, sys, tempfile

B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
SOURCES = [("dict-jargon", "jargon", "The Jargon File 4.4.7"),
           ("dict-devil", "devil", "The Devil's Dictionary (Ambrose Bierce, 1911)")]


def b64(s):
    v = 0
    for ch in s:
        v = v * 64 + B64.index(ch)
    return v


def entries(dict_bytes, index_text):
    for line in index_text.splitlines():
        word, off, length = line.split("\t")[:3]
        if word.startswith("00-database") or word.startswith("00database"):
            continue
        body = dict_bytes[b64(off):b64(off) + b64(length)].decode("utf-8").strip()
        if body:
            yield word, body


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "data", "sample",
                                                  "sample.jsonl.zst"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        docs = []
        for package, name, title in SOURCES:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True,
                           stdout=subprocess.DEVNULL)
            deb = next(f for f in os.listdir(tmp) if f.startswith(package + "_"))
            subprocess.run(["dpkg-deb", "-x", deb, "root"], cwd=tmp, check=True)
            base = os.path.join(tmp, "root", "usr", "share", "dictd", name)
            with gzip.open(base + ".dict.dz") as f:
                data = f.read()
            with open(base + ".index", encoding="utf-8") as f:
                index = f.read()
            version = deb.split("_")[1]
            for word, body in entries(data, index):
                docs.append({"text": body, "meta": {"source": f"{title}, Debian {package} {version}",
                                                    "title": word, "licence": "public domain"}})
        jsonl = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
        raw = os.path.join(tmp, "sample.jsonl")
        with open(raw, "wb") as f:
            f.write(jsonl)
        subprocess.run(["zstd", "-q", "-19", "-f", raw, "-o", args.out], check=True)
        print(f"{len(docs)} documents, {len(jsonl)} bytes of JSONL -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
