def test_open_clip_imports_in_driver():
    from cidistill.core.runtime import import_open_clip

    oc = import_open_clip()
    assert "ViT-B-32" in oc.list_models()


def test_open_clip_imports_in_ray_worker(ray_session):
    ray = ray_session

    @ray.remote
    def probe():
        import open_clip  # the worker_process_setup_hook applied the torchvision fix first

        return open_clip.__version__

    assert ray.get(probe.remote())


def test_a_one_cpu_ray_task_runs_one_thread_per_pool(ray_session):
    """The worker's set-up hook imports torch before Ray sets OMP_NUM_THREADS for a task, so torch's pool and
    the OpenMP one faiss shares came up one thread per core: two one-CPU tasks at once ran a thread per core each
    (the balance stage's SemDeDup kernels 14x slower). run_tasks holds them to the task's CPUs."""
    from cidistill.core.stage import run_tasks

    def pools(_):
        import faiss
        import torch
        from threadpoolctl import threadpool_info

        blas = {p["num_threads"] for p in threadpool_info() if p["user_api"] in ("blas", "openmp")}
        return torch.get_num_threads(), faiss.omp_get_max_threads(), blas

    got = run_tasks(pools, [0, 1], use_ray=True)
    assert all(r.ok for r in got) and [r.value for r in got] == [(1, 1, {1})] * 2


def test_a_task_that_fails_for_good_is_reported_by_its_cause(ray_session):
    """A stage's failed units were listed by Ray's own first line, `RayTaskError(FileNotFoundError):
    \x1b[36mray::_download_one()\x1b[39m (pid=…)` (colour codes in a log file too), not by what went wrong."""
    from cidistill.app.cli import one_line
    from cidistill.core.stage import run_tasks

    def missing(item):
        raise FileNotFoundError(f"/work/download/_tmp/{item}.feather")

    got = run_tasks(missing, [3], use_ray=True, retries=0)
    assert not got[0].ok and got[0].error == "FileNotFoundError: /work/download/_tmp/3.feather"
    assert isinstance(got[0].exc, FileNotFoundError)
    assert one_line(RuntimeError("\x1b[36mray::task()\x1b[39m (pid=1)")) == "ray::task() (pid=1)"


def test_the_cli_sets_openmps_spin_count_before_torch_loads():
    """OpenMP reads GOMP_SPINCOUNT once, when torch's libgomp loads: the CLI must set it before any import of
    torch (a user's own value is kept)."""
    import os
    import subprocess
    import sys

    code = """
import builtins, os, sys
seen = []
real = builtins.__import__
def spy(name, *a, **k):
    if name == "torch" and "torch" not in sys.modules and not seen:
        seen.append(os.environ.get("GOMP_SPINCOUNT"))
    return real(name, *a, **k)
builtins.__import__ = spy
import cidistill.app.cli
print(seen[0] if seen else "torch not imported")
"""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "30000"
    out = subprocess.run([sys.executable, "-c", code], env=dict(env, GOMP_SPINCOUNT="5"), capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "5"


def test_progress_in_a_log_is_a_line_per_tenth_and_none_at_the_end(capsys):
    """Where stdout is not a terminal (a log file, `ray job logs`): one line per tenth reached, none at 100 %
    (the stage's summary line follows); `rate=False` for units that have none (the eval's parts)."""
    from cidistill.core.progress import Progress

    bar = Progress(10, "eval", unit="part", min_gap=0, rate=False)
    for part in range(10):
        bar.set_postfix(done=f"student.{part}")
        bar.update()
    bar.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[eval] 10% (1/10 part) done=student.0" and len(lines) == 9, lines
    bar = Progress(200, "embed", unit="img", min_gap=0)
    bar.update(150)
    assert capsys.readouterr().out.strip().startswith("[embed] 70% (150/200 img, ")


def test_local_workers_get_a_checkout_on_their_path_but_never_site_packages(monkeypatch):
    """An installed package's folder is site-packages: on the workers' PYTHONPATH it would come before the
    standard library, and img2dataset's `dataclasses` backport there broke every Ray worker of a
    non-editable install (each failed to start, five times, then the stage)."""
    import site
    from pathlib import Path

    import cidistill.core.runtime as rt

    root = Path(rt.__file__).resolve().parents[2]
    assert rt.checkout_root() == str(root)                      # this checkout (an editable install)
    monkeypatch.setattr(site, "getsitepackages", lambda: ["/nowhere", str(root)])
    assert rt.checkout_root() is None                           # the same files, installed


def test_a_cache_entry_is_filled_by_one_process_and_a_killed_holder_frees_it(tmp_path):
    """Two demos at once on one cache (or the tests beside a demo) raced: one unpacked a package while the other
    deleted it. cache_lock makes the second wait, says for whom, and a SIGKILLed holder never leaves it held."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    lock = tmp_path / "entry.lock"
    take = ("import sys, time; from pathlib import Path; from cidistill.core.runtime import cache_lock\n"
            "with cache_lock(Path(sys.argv[1]), 'filling the entry'):\n"
            "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n")
    holder = subprocess.Popen([sys.executable, "-S", "-c", take, str(lock), "300"], cwd=root, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    waiter = subprocess.Popen([sys.executable, "-S", "-c", take, str(lock), "0"], cwd=root, stdout=subprocess.PIPE, text=True)
    first = waiter.stdout.readline().strip()
    assert first == f"[cache] waiting for pid {holder.pid} on {__import__('socket').gethostname()}, which is filling the entry"
    time.sleep(1.0)
    assert waiter.poll() is None  # still waiting while the holder lives
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    out, _ = waiter.communicate(timeout=30)
    assert out.strip() == "held" and waiter.returncode == 0


def test_two_fetches_of_a_demo_package_at_once_and_a_tarball_cut_short(tmp_path):
    """Two processes fetching one npm package into one cache both end with it whole (one fetched it, one
    waited); a tarball cut short in the cache (a fetch stopped half-way, a full disk) is fetched again."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    name, version = "cldr-annotations-derived-full", "48.2.0"  # the smallest of the demo's packages (4 MB)
    fetch = ("import sys; from pathlib import Path; from cidistill.app.demo_packages import fetch_package\n"
             f"out = fetch_package({name!r}, {version!r}, Path(sys.argv[1])); print(len(list(out.rglob('*.json'))))\n")
    runs = [subprocess.Popen([sys.executable, "-S", "-c", fetch, str(tmp_path)], cwd=root, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [r.communicate(timeout=300) for r in runs]
    assert [r.returncode for r in runs] == [0, 0], [e[-2000:] for _, e in outs]
    counts = [o.strip().splitlines()[-1] for o, _ in outs]
    assert counts == ["2", "2"], outs  # its English and Chinese annotations
    assert sum("[cache] waiting for" in o for o, _ in outs) == 1, outs
    tgz = tmp_path / "npm" / f"{name}-{version}.tgz"
    size = tgz.stat().st_size
    with open(tgz, "r+b") as f:
        f.truncate(size // 3)
    (tmp_path / f"{name}-{version}" / ".complete").unlink()
    again = subprocess.run([sys.executable, "-S", "-c", fetch, str(tmp_path)], cwd=root, capture_output=True, text=True)
    assert again.returncode == 0 and again.stdout.strip() == counts[0], again.stderr[-2000:]
    assert tgz.stat().st_size == size
    assert sorted(p.name for p in (tmp_path / "npm").iterdir()) == [tgz.name]  # no temporary tarball left


def test_a_long_tmpdir_still_starts_ray_and_a_long_ray_tmpdir_is_named(tmp_path, monkeypatch):
    """Ray makes its sockets under TMPDIR, and an AF_UNIX path has at most 107 bytes: a batch job's or a CI
    runner's long TMPDIR failed every command with `validate_socket_filename failed: AF_UNIX path length cannot
    exceed 107 bytes`. A local cluster then keeps its session in /tmp/ray; a RAY_TMPDIR chosen too long is named.
    The same run's stdout is a file (a batch job's log): Ray's `(pid=…)` prefixes of a worker's lines came
    wrapped in ANSI colour escapes."""
    import os
    import subprocess
    import sys

    import pytest

    long_tmp = tmp_path / ("t" * 80)
    long_tmp.mkdir()
    code = ("from cidistill.core.runtime import init_ray\n"
            "ray = init_ray(num_cpus=1)\n"
            "@ray.remote\n"
            "def hello():\n"
            "    print('hello from a worker', flush=True)\n"
            "    return 1 + 1\n"
            "print('sum', ray.get(hello.remote()), flush=True)\n"
            "import time; time.sleep(2)\n"  # the log monitor forwards the worker's line
            "ray.shutdown()\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_TMPDIR")}
    run = subprocess.run([sys.executable, "-c", code], env=dict(env, TMPDIR=str(long_tmp)), capture_output=True,
                         text=True, timeout=180)
    assert run.returncode == 0 and "sum 2" in run.stdout, run.stderr[-2000:]
    assert "TMPDIR is too long for Ray's sockets; Ray's session folder is /tmp/ray" in run.stderr
    assert "hello from a worker" in run.stdout and "\x1b[" not in run.stdout, repr(run.stdout)

    from cidistill.core.errors import StageError
    from cidistill.core.runtime import ray_temp_dir

    monkeypatch.setenv("RAY_TMPDIR", str(long_tmp))
    with pytest.raises(StageError, match=r"^RAY_TMPDIR='.*' is too long for the sockets Ray makes in it \(at most 39 "):
        ray_temp_dir()
    monkeypatch.setenv("RAY_TMPDIR", "/tmp")
    assert ray_temp_dir() is None
