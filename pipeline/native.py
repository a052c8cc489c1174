"""The SemDeDup kernels in C (semdedup_kernels.c), compiled on first use with the system C compiler and cached
per source, compiler and CPU under the cidistill cache; loaded with ctypes (the calls release the GIL).

`semdedup_lib()` returns None, after one warning, where no compiler works or `CIDISTILL_NATIVE=0`: the callers
then keep their torch path, which gives the same answers more slowly."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path

from cidistill.core.runtime import cache_dir

SRC = Path(__file__).with_name("semdedup_kernels.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-shared", "-fPIC"]


def _cpu_id() -> str:
    """The CPU's model and flags: -march=native code must not be reused on another CPU sharing the cache."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "|".join(sorted({ln for ln in lines if ln.startswith(("model name", "flags"))}))
    except OSError:
        return platform.processor() or platform.machine()


def whole_elf(path: Path) -> bool:
    """A shared library cut short after it was built (a damaged cache) can pass dlopen's checks and then kill
    the process with SIGBUS when a missing page is touched: its section header table, written last, must lie
    inside the file."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:  # a 64-bit ELF, as cc -shared writes here
        return False
    end = "<" if head[5] == 1 else ">"
    (shoff,), (shentsize, shnum) = struct.unpack_from(end + "Q", head, 0x28), struct.unpack_from(end + "HH", head, 0x3A)
    return shoff + shentsize * shnum <= path.stat().st_size


def build(src: Path = SRC, cc: str | None = None) -> Path:
    """Compile `src` into the cache (atomically: a temp file, then rename) unless it is there already."""
    cc = cc or os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise RuntimeError("no C compiler (cc/gcc) on PATH and CC is not set")
    key = hashlib.sha256("\n".join([src.read_text(), cc, " ".join(FLAGS), _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"{src.stem}-{key}.so"
    if out.exists() and whole_elf(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(src), "-o", tmp, "-lm"], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{cc} failed on {src.name}: {r.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=1)
def semdedup_lib() -> ctypes.CDLL | None:
    if os.environ.get("CIDISTILL_NATIVE", "1") == "0":
        return None
    import torch  # noqa: F401  (loads torch's OpenMP first: the kernels then share that runtime and its threads)

    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"SemDeDup C kernels unavailable, using the torch path (same answers, slower): {e}")
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.quantise_rows.argtypes = [p, i64, p, i64, p, p]
    lib.row_max.argtypes = [p, i64, i64, i64, ctypes.c_int32, p, p]
    lib.pair_dots.argtypes = [p, i64, p, p, i64, p]
    for f in (lib.quantise_rows, lib.row_max, lib.pair_dots):
        f.restype = None
    return lib
