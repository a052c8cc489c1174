"""Process set-up shared by the driver and every Ray worker: quiet offline defaults, the torchvision
op-schema fix, and Ray start/join."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

log = logging.getLogger("cidistill")

# Offline-safe defaults; a user who exports another value keeps it.
ENV_DEFAULTS = {
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
    "PYTHONWARNINGS": "ignore::UserWarning:albumentations",
    "TRANSFORMERS_VERBOSITY": "error",          # no load reports for the pooler a sentence encoder never uses
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",        # Ray Train's print-to-logger showed a worker's progress lines twice
    # OpenMP threads (torch's libgomp) spin 30k rather than 300k times before sleeping: between a training
    # step's parallel regions they hand the core to the loader processes (idle class) sooner. On the 2-core
    # bench the streamed steps waited ~3x less and ran 5 % faster; compute-only steps the same.
    # Read when libgomp loads: set before torch is imported (the CLI does; Ray workers get it in their env).
    "GOMP_SPINCOUNT": "30000",
}
# libraries whose INFO/WARNING lines a user cannot act on (open_clip logs "No pretrained weights loaded" for
# every student built from scratch, on the root logger); `cidistill -v` shows them
QUIET_SOURCES = ("open_clip", "transformers", "ray/data", "ray/train", "ray/tune", "torch/distributed", "botocore",
                 "aiobotocore", "s3fs")


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR or not any(f"/{s}/" in record.pathname for s in QUIET_SOURCES)


def quiet_logs() -> None:
    """Below ERROR, nothing from QUIET_SOURCES reaches the console, unless CIDISTILL_VERBOSE=1 (`-v`)."""
    if os.environ.get("CIDISTILL_VERBOSE") == "1":
        return
    # Ray Data sets its loggers' levels when it is imported, from this variable first: its INFO lines
    # ("Dataset … execution finished") and WARNINGs ("Progress bars disabled") would otherwise reach the console
    os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    for name in ("", "ray.data", "ray.train", "ray.tune", "transformers"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Quiet) for f in logger.filters):
            logger.addFilter(_Quiet())
    for name in ("ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for name in ("botocore", "aiobotocore", "s3fs"):  # "Found credentials in environment variables." per worker
        logging.getLogger(name).setLevel(logging.WARNING)


def cache_dir() -> Path:
    """Caches kept between runs (demo data, the demo teacher, compiled kernels): CIDISTILL_CACHE, else
    $XDG_CACHE_HOME/cidistill, else ~/.cache/cidistill. Local to each node, never in the work folder."""
    from .errors import StageError

    base = os.environ.get("XDG_CACHE_HOME") or (str(home() / ".cache") if home() else "")
    root = os.environ.get("CIDISTILL_CACHE") or (os.path.join(base, "cidistill") if base else "")
    if not root:
        raise StageError("no cache folder: this user has no home folder; set CIDISTILL_CACHE to a writable folder")
    if root not in _checked_caches:  # a container's user often has no writable home: say so, and what to set
        try:
            Path(root).mkdir(parents=True, exist_ok=True)
            if not os.access(root, os.W_OK | os.X_OK):
                raise PermissionError(13, "Permission denied")
        except OSError as e:
            raise StageError(f"the cache folder {root} cannot be written ({e.strerror or e}): set CIDISTILL_CACHE "
                             "to a writable folder") from None
        _checked_caches.add(root)
    return Path(root)


_checked_caches: set[str] = set()


@contextlib.contextmanager
def cache_lock(path: Path, what: str):
    """One process of this node at a time fills a cache entry (two demos at once, the tests beside a demo): the
    others wait, then find it filled. An flock on the file `path`: the kernel drops it when its holder dies, so
    a killed run never leaves it held. `what` names the work in the one line a waiting process prints."""
    import fcntl
    import socket
    import time

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(0.2)  # the holder writes its name just after it takes the lock
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            print(f"[cache] waiting for {holder}, which is {what}", flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def writable_folder(folder: Path) -> bool:
    """Whether `folder` is (or can be made) a folder this user writes in."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)


def home() -> Path | None:
    """The user's home folder; None where it cannot be known (no HOME, a user id with no passwd entry)."""
    try:
        return Path.home()
    except (RuntimeError, KeyError):
        return None


def native_bf16_cpu() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Elsewhere torch emulates it: a bf16
    training step of the demo student took 15x as long as fp32 on an AVX2-only EPYC."""
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & set(flags.split()))


def resolve_precision(precision: str, device: str) -> str:
    """`auto` → bf16 on CUDA or a CPU with native bf16, else fp32; any other value as it is."""
    if precision != "auto":
        return precision
    return "bf16" if device == "cuda" or (device == "cpu" and native_bf16_cpu()) else "fp32"


def embed_precision(precision: str, device: str) -> str:
    """What the teacher embeds in (`teacher.precision`): `auto` is bf16 on a GPU and fp32 on a CPU, even one with
    native bf16. There bf16 took the demo's embed from 115 to 73 s, but the student trained on those features
    scored EN 14.7 % / ZH 13.2 % against 17.5 % / 15.3 % on fp32 ones from the same teacher (docs/experiments.md)."""
    return "fp32" if precision == "auto" and device != "cuda" else resolve_precision(precision, device)


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to n (0: left alone) for a block, then restored. A stage run in this process
    must not hand its setting on (`cidistill run --no-ray`: embed, then train): the next stage would run on
    other threads, and round differently (a float sum split another way)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def task_threads(cpus: float):
    """A Ray task's thread pools (torch's intra-op pool, OpenMP, OpenBLAS) held to the CPUs it was given, for
    the task, then restored. Ray sets OMP_NUM_THREADS for a task only after the worker's set-up hook has
    imported torch (the torchvision fix), so without this every one-CPU task ran a pool per core: two balance
    tasks on two cores ran their SemDeDup kernels 14x slower than one task on one thread."""
    from threadpoolctl import threadpool_limits

    n = max(1, int(cpus))
    # torch's pool only when loaded: a library loaded later in the task reads the OMP_NUM_THREADS Ray set
    with torch_threads(n) if "torch" in sys.modules else contextlib.nullcontext(), threadpool_limits(limits=n):
        yield


def set_env_defaults() -> None:
    for k, v in ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if not sys.stdout.isatty():  # a log file: the Ray workers' line prefixes without colour escape codes
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")
    if "MPLCONFIGDIR" not in os.environ and not os.environ.get("XDG_CONFIG_HOME") and not _home_writable():
        # matplotlib would warn twice (the cards) and make a temporary folder per process: ours instead
        os.environ["MPLCONFIGDIR"] = os.path.join(tempfile.gettempdir(), f"cidistill-matplotlib-{os.getuid()}")


def _home_writable() -> bool:
    h = home()
    return bool(h) and os.access(h, os.W_OK | os.X_OK)


# The demo needs nothing from a hub and runs with it off (no lookups); a user's run lets open_clip fetch the
# teacher's tag. Set before huggingface_hub is imported (it reads them once); Ray workers inherit them.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def go_offline() -> None:
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


_TV_LOCK = threading.Lock()
_TV_LIB = None  # keeps the fallback torch.library alive (a collected Library unregisters its ops)
_TV_CHECKED = False


def fix_torchvision() -> bool:
    """Make `import torchvision` (and so `import open_clip`) work when its compiled ops cannot load.

    PyPI's torchvision 0.28.0 is a CUDA build; on CPU torch its `_C` extension fails to load and
    `torchvision._meta_registrations` then dies with "operator torchvision::nms does not exist".
    Registering the two op schemas lets the pure-Python parts import. When the real ops load
    (matching torch, e.g. CUDA on a GPU box) nothing is changed. Returns True when the fallback was used.
    """
    global _TV_LIB, _TV_CHECKED
    with _TV_LOCK:
        if _TV_CHECKED:
            return _TV_LIB is not None
        _TV_CHECKED = True
        import torch

        spec = importlib.util.find_spec("torchvision")
        if spec is None or spec.origin is None:
            return False
        if _has_op("nms"):
            return False
        libs = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
        for lib_path in libs:
            try:
                torch.ops.load_library(str(lib_path))
                if _has_op("nms"):
                    return False
            except (OSError, RuntimeError):
                pass
        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            if not _has_op(op):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_LIB = lib
        log.debug("torchvision compiled ops unavailable; registered nms/qnms schemas")
        return True


def _has_op(name: str) -> bool:
    import torch

    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


def import_open_clip():
    """The one place the project imports open_clip: env defaults and the torchvision fix first."""
    set_env_defaults()
    fix_torchvision()
    import open_clip

    if os.environ.get("CIDISTILL_VERBOSE") != "1":
        try:  # HF towers: no "Loading weights" bar per model built
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
        except ImportError:
            pass
    return open_clip


def worker_setup() -> None:
    """Ray `worker_process_setup_hook`: every worker gets the same environment, fix and quiet as the driver."""
    set_env_defaults()
    quiet_logs()
    fix_torchvision()


def unreachable(address: str, timeout: float = 5.0) -> str | None:
    """Why nothing listens at a Ray address's host:port (None: something does, or the form is not host:port)."""
    import socket

    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not host or not port.isdigit():
        return None  # `auto` and other forms: Ray's own lookup
    try:
        socket.create_connection((host, int(port)), timeout).close()
    except OSError as e:
        return e.strerror or str(e)
    return None


_local_cluster: bool | None = None  # whether init_ray started the cluster here (it cannot grow) or joined one


def require_resources(per_unit: dict[str, float], units: int, setting: str, spare_cpu: float = 0.0) -> None:
    """Ray waits for what a request names even where the cluster can never provide it: an actor pool hangs
    silently, Ray Train retries with a page of tracebacks a minute; an actor pool on every CPU starves the
    tasks that feed it (`spare_cpu`: what they need), again silently. On the local cluster this process
    started, fail at once; on a joined one (it may autoscale) say what is awaited, once."""
    import math

    import ray

    need = {k: float(v) for k, v in per_unit.items() if v}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fits = sum(min(math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in need.items()) for node in nodes)
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    left = cpus - units * need.get("CPU", 0.0)
    if not need or (fits >= units and left + 1e-9 >= spare_cpu):
        return
    have = ", ".join(f"{sum(n.get(k, 0.0) for n in nodes):g} {k}" for k in need)
    msg = (f"{setting} does not fit in this Ray cluster ({have} on {len(nodes)} node(s))" if fits < units else
           f"{setting} leaves {max(left, 0):g} of the Ray cluster's {cpus:g} CPUs to the tasks that feed it, which "
           f"need {spare_cpu:g}")
    if _local_cluster:
        from .errors import StageError

        raise StageError(f"{msg}; ask for less, or join a larger cluster (ray_address)")
    print(f"[cidistill] waiting: {msg} now; an autoscaling cluster adds nodes, another waits for ever", flush=True)


def checkout_root() -> str | None:
    """The folder above this package when it is a checkout that local Ray workers could not import otherwise;
    None when the package is installed (site-packages: on PYTHONPATH it would come before the standard library,
    and img2dataset's dependency `dataclasses`, a Python 3.6 backport, would then replace the real module in
    every worker)."""
    import site
    import sysconfig

    root = Path(__file__).resolve().parents[2]
    installed = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")} | set(site.getsitepackages())
    installed.add(site.getusersitepackages())
    return None if any(root == Path(p).resolve() for p in installed if p) else str(root)


# the longest socket path Ray makes under its temp folder (the plasma store's, a session named by date and pid)
RAY_SOCKET_TAIL = len("/session_2026-12-04_05-10-24_360121_4194304/sockets/plasma_store")


def ray_temp_dir() -> str | None:
    """A local cluster's temp folder when Ray's own choice (RAY_TMPDIR, else TMPDIR, + /ray) is too long for the
    AF_UNIX sockets it makes there (107 bytes; batch schedulers and pytest give long TMPDIRs): /tmp/ray. None:
    Ray's choice works. An explicit RAY_TMPDIR that is too long is an error naming it."""
    from ray._common.utils import get_default_ray_temp_dir

    default = get_default_ray_temp_dir()
    if len(os.fsencode(default)) + RAY_SOCKET_TAIL <= 107:
        return None
    from .errors import StageError

    if os.environ.get("RAY_TMPDIR"):
        raise StageError(f"RAY_TMPDIR={os.environ['RAY_TMPDIR']!r} is too long for the sockets Ray makes in it "
                         f"(at most {107 - RAY_SOCKET_TAIL - len('/ray')} characters): set a shorter folder")
    print("[cidistill] TMPDIR is too long for Ray's sockets; Ray's session folder is /tmp/ray (RAY_TMPDIR "
          "chooses another)", file=sys.stderr)
    return "/tmp/ray"


def init_ray(address: str | None = None, num_cpus: int | None = None, **kwargs):
    """Join `address` (or RAY_ADDRESS) when given, else start a quiet local cluster on 127.0.0.1."""
    set_env_defaults()
    import ray

    if ray.is_initialized():
        return ray
    global _local_cluster
    _local_cluster = not (address or os.environ.get("RAY_ADDRESS"))
    main_thread = threading.current_thread() is threading.main_thread()
    on_sigterm = signal.getsignal(signal.SIGTERM) if main_thread else None
    address = address or os.environ.get("RAY_ADDRESS") or None
    runtime_env = {"worker_process_setup_hook": "cidistill.core.runtime.worker_setup",
                   "env_vars": {k: os.environ[k] for k in (*ENV_DEFAULTS, *OFFLINE_ENV, "CIDISTILL_VERBOSE")
                                if k in os.environ}}
    from .store import storage_env

    runtime_env["env_vars"].update(storage_env())
    if address:
        from .errors import StageError

        def no_cluster(why: str) -> StageError:
            return StageError(f"ray_address {address!r}: no Ray cluster answers there ({why}); start one with "
                              "`ray start --head`, or leave ray_address (and RAY_ADDRESS) empty for a local one")

        why = unreachable(address)
        if why:  # ray.init would wait on it for minutes, printing its own retries
            raise no_cluster(why)
        if address.split(":")[0] in ("127.0.0.1", "localhost"):  # a cluster of local nodes (tests, one box)
            kwargs.setdefault("_node_ip_address", "127.0.0.1")
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, configure_logging=True,
                     logging_level=logging.INFO if os.environ.get("CIDISTILL_VERBOSE") == "1" else logging.WARNING,
                     **kwargs)
        except ConnectionError as e:  # something else listens there
            raise no_cluster(str(e).splitlines()[0]) from None
    else:
        root = checkout_root()
        runtime_env["env_vars"]["PYTHONPATH"] = os.pathsep.join(
            p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        if "_temp_dir" not in kwargs:
            kwargs["_temp_dir"] = ray_temp_dir()
        # address="local": always a fresh local instance, never a stale one a test cluster recorded in /tmp/ray
        ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=False,
                 runtime_env=runtime_env, configure_logging=True, logging_level=logging.WARNING, **kwargs)
    if callable(on_sigterm):  # ray.init replaces it (the driver then aborts with a C++ stack dump); keep the CLI's
        signal.signal(signal.SIGTERM, on_sigterm)
    try:  # Ray Data's per-op progress bars are noisy in logs; keep the global one
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_operator_progress_bars = False
        ctx.print_on_execution_start = False
        if os.environ.get("CIDISTILL_VERBOSE") != "1":  # the embed stage shows its own progress
            ctx.enable_progress_bars = False
    except Exception:  # older Ray
        pass
    return ray
