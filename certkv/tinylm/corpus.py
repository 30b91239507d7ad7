"""Build the tinylm training corpus from Debian packages that every machine here can install.

Sources (pinned by Debian package, so the corpus is reproducible from a fresh machine):

* ``python3.11-doc``: the HTML pages of the Python 3.11 documentation, converted to plain text
  (English prose);
* ``libpython3.11-minimal`` and ``libpython3.11-stdlib``: the CPython 3.11 standard-library
  ``.py`` sources (code). Debian ships the ``test/`` package separately, and any ``test``/``tests``
  folder is excluded here as well.

Documents (whole pages or files) are split with a fixed seed: ``HELDOUT_FRACTION`` of them are held
out for evaluation and never trained on. Each split is written as UTF-8 text with documents
separated by a NUL byte (which no source document contains); the trainer maps NUL to EOS.

Usage: ``python -m certkv.tinylm.corpus --out .corpus``
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import random
import subprocess
import tempfile
from pathlib import Path
from typing import ClassVar

PACKAGES = ("python3.11-doc", "libpython3.11-minimal", "libpython3.11-stdlib")
HELDOUT_FRACTION = 0.03
SEED = 20261122
DOC_SEPARATOR = "\x00"


class _TextExtractor(html.parser.HTMLParser):
    """HTML to plain text: drops scripts, styles and navigation chrome, keeps block structure."""

    _SKIP: ClassVar[set[str]] = {"script", "style", "head", "nav"}
    _BLOCK: ClassVar[set[str]] = {
        "p",
        "div",
        "pre",
        "li",
        "h1",
        "h2",
        "h3",
        "h4",
        "h5",
        "dt",
        "dd",
        "tr",
        "br",
        "section",
    }

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip_tags: list[str] = []
        self._in_pre = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        classes = dict(attrs).get("class") or ""
        if self._skip_tags:
            if tag == self._skip_tags[-1]:
                self._skip_tags.append(tag)
            return
        if tag in self._SKIP or "related" in classes or "sphinxsidebar" in classes or "footer" in classes:
            self._skip_tags.append(tag)
            return
        if tag == "pre":
            self._in_pre += 1
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag: str) -> None:
        if self._skip_tags:
            if self._skip_tags[-1] == tag:
                self._skip_tags.pop()
            return
        if tag == "pre":
            self._in_pre = max(0, self._in_pre - 1)
        if tag in self._BLOCK:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        if self._skip_tags:
            return
        self.parts.append(data if self._in_pre else " ".join(data.split(" ")))

    def text(self) -> str:
        raw = "".join(self.parts).replace("\u00b6", "")
        lines = [line.rstrip() for line in raw.splitlines()]
        out: list[str] = []
        for line in lines:
            if line or (out and out[-1]):
                out.append(line)
        return "\n".join(out).strip() + "\n"


def html_to_text(page: str) -> str:
    parser = _TextExtractor()
    parser.feed(page)
    return parser.text()


def _extract(pkg_dir: Path, dest: Path) -> None:
    subprocess.run(["apt-get", "download", *PACKAGES], cwd=pkg_dir, check=True, capture_output=True)
    for deb in sorted(pkg_dir.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(dest)], check=True)


def collect_documents(root: Path) -> list[tuple[str, str]]:
    """(name, text) of every document, sorted by name so the split does not depend on the file system."""
    docs: list[tuple[str, str]] = []
    for page in sorted((root / "usr/share/doc/python3.11/html").rglob("*.html")):
        if "_static" in page.parts or page.name in {"genindex.html", "search.html", "py-modindex.html"}:
            continue
        if page.name.startswith("genindex-"):
            continue
        text = html_to_text(page.read_text(encoding="utf-8", errors="replace"))
        if len(text) > 200:
            docs.append((f"doc/{page.relative_to(root)}", text))
    for src in sorted((root / "usr/lib/python3.11").rglob("*.py")):
        rel = src.relative_to(root)
        if {"test", "tests", "idle_test"} & set(rel.parts) or "site-packages" in rel.parts:
            continue
        text = src.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append((f"py/{rel}", text.replace(DOC_SEPARATOR, "")))
    return docs


def split(docs: list[tuple[str, str]], seed: int = SEED) -> tuple[list[str], list[str]]:
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    n_held = max(1, round(HELDOUT_FRACTION * len(docs)))
    held = set(order[:n_held])
    train = [docs[i][1] for i in range(len(docs)) if i not in held]
    heldout = [docs[i][1] for i in range(len(docs)) if i in held]
    return train, heldout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(".corpus"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pkg_dir, root = Path(tmp) / "debs", Path(tmp) / "root"
        pkg_dir.mkdir()
        root.mkdir()
        _extract(pkg_dir, root)
        docs = collect_documents(root)
    train, heldout = split(docs)
    for name, part in (("train", train), ("heldout", heldout)):
        blob = DOC_SEPARATOR.join(part).encode("utf-8")
        with gzip.GzipFile(args.out / f"{name}.txt.gz", "wb", mtime=0) as fh:
            fh.write(blob)
        digest = hashlib.sha256(blob).hexdigest()[:16]
        print(f"{name}: {len(part)} documents, {len(blob):,} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
