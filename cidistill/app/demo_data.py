"""The embedded demo dataset: real emoji images in three artists' styles with English and Chinese captions,
built from registry packages (npm: emoji-datasource-{apple,google,twitter}, cldr-annotations-*), cached in
the user's cache dir, and served over HTTP on 127.0.0.1 so the download stage really downloads."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from cidistill.core.runtime import cache_dir
from cidistill.core.store import Store, split_uri
from cidistill.app.demo_packages import VENDORS, fetch_all

SMALL_BASES = 70          # base emoji in the small (test) variant, all vendors and skin tones of each


def _char(unified: str) -> str:
    return "".join(chr(int(c, 16)) for c in unified.split("-"))


class _Annotations:
    def __init__(self, root_full: Path, root_derived: Path, lang: str):
        self.maps = []
        for root, key in ((root_full, "annotations"), (root_derived, "annotationsDerived")):
            f = next(root.rglob(f"{key}/{lang}/annotations.json"))
            self.maps.append(json.loads(f.read_text(encoding="utf-8"))[key]["annotations"])

    def lookup(self, ch: str) -> tuple[str, list[str]]:
        for c in (ch, ch.replace("\ufe0f", "")):
            for m in self.maps:
                if c in m:
                    return m[c].get("tts", [""])[0], list(m[c].get("default", []))
        return "", []


def _caption(name: str, keywords: list[str], sep: str, lang_sep: str) -> str:
    extra = [k for k in keywords if k and k not in name][:3]
    return name + (lang_sep + sep.join(extra) if extra else "")


@dataclass
class DemoData:
    root: Path             # cache folder with images/<vendor>/<file>.png
    table: pa.Table        # one row per image: path, caption, caption_zh, emoji, base, base_name(_zh), group, subgroup, vendor


@functools.lru_cache(maxsize=2)
def build_demo_data(small: bool = False) -> DemoData:
    root = cache_dir() / "demo"
    pk = fetch_all()
    en = _Annotations(pk["cldr-annotations-full"], pk["cldr-annotations-derived-full"], "en")
    zh = _Annotations(pk["cldr-annotations-full"], pk["cldr-annotations-derived-full"], "zh")
    emoji = json.loads(next(pk["emoji-datasource-apple"].rglob("emoji.json")).read_text(encoding="utf-8"))
    emoji.sort(key=lambda e: e["sort_order"])
    if small:  # a spread over categories, skin-tone emoji included: natural near-duplicates
        rnd = random.Random(0)
        with_skin = [e for e in emoji if e.get("skin_variations")]
        without = [e for e in emoji if not e.get("skin_variations")]
        emoji = sorted(rnd.sample(with_skin, 6) + rnd.sample(without, SMALL_BASES - 6), key=lambda e: e["sort_order"])
    rows = []
    for e in emoji:
        base = _char(e["unified"])
        base_en, _ = en.lookup(base)
        base_zh, _ = zh.lookup(base)
        base_en = base_en or e["name"].lower()
        variants = [e] + list((e.get("skin_variations") or {}).values())
        for var in variants:
            ch = _char(var["unified"])
            name_en, kw_en = en.lookup(ch)
            name_zh, kw_zh = zh.lookup(ch)
            name_en = name_en or base_en
            for v in VENDORS:
                img = pk[f"emoji-datasource-{v}"] / "package" / "img" / v / "64" / var["image"]
                if not var.get(f"has_img_{v}") or not img.exists():
                    continue
                rows.append({
                    "path": f"{v}/{var['image']}",
                    "caption": _caption(name_en, kw_en, ", ", ", "),
                    "caption_zh": _caption(name_zh, kw_zh, "，", "，") if name_zh else "",
                    "emoji": ch, "base": base, "base_name": base_en, "base_name_zh": base_zh or "",
                    "group": e["category"], "subgroup": e["subcategory"], "vendor": v,
                })
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    for v in VENDORS:
        link, target = images / v, pk[f"emoji-datasource-{v}"] / "package" / "img" / v / "64"
        if link.is_symlink() and Path(os.readlink(link)) == target:
            continue
        if link.is_dir() and not link.is_symlink():
            continue  # a copy of the images put there by hand
        # made beside and renamed over: another demo may be making it at once, and a link left pointing into
        # a cache folder that moved is replaced
        tmp = link.with_name(f".{v}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    return DemoData(root=images, table=pa.Table.from_pylist(rows))


class LoopbackServer:
    """Serves a folder over HTTP on 127.0.0.1 from a daemon thread (the demo's stand-in for the web)."""

    def __init__(self, folder: Path, port: int = 0):
        handler = functools.partial(_QuietHandler, directory=str(folder))
        try:
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
        except OSError:  # wanted port taken: any free one
            self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def write_urls(demo: DemoData, base_url: str, out: str | Path) -> str:
    """urls.parquet at `out` (a local path or a URI): url, caption and the columns evaluation needs."""
    t = demo.table
    urls = pa.array([f"{base_url}/{p}" for p in t.column("path").to_pylist()])
    folder, name = split_uri(str(out))
    Store(folder).write_table(name, t.drop(["path"]).add_column(0, "url", urls))
    return str(out)


def urls_port(out: str) -> int:
    """The port a previous run's urls.parquet points at, so a resumed demo serves the same URLs."""
    try:
        folder, name = split_uri(out)
        first = Store(folder).read_table(name, columns=["url"]).column("url")[0].as_py()
        return int(first.split(":")[2].split("/")[0])
    except Exception:
        return 0


def table_digest(table: pa.Table) -> str:
    h = hashlib.sha256()
    for col in table.column_names:
        h.update(col.encode())
        h.update(json.dumps(table.column(col).to_pylist(), ensure_ascii=False).encode())
    return h.hexdigest()[:16]
