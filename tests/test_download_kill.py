"""No silent loss after a kill during download, with Ray: the demo's driver (which also serves the images)
is SIGKILLed while img2dataset runs in Ray workers; the workers outlive it briefly and their fetches fail
(connection refused). Those failures are transient, so those shards are not final: the rerun downloads every
URL the server can serve."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _demo_download(workdir: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "cidistill", "demo", "--small", "--workdir", str(workdir),
                             "--stages", "download"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_sigkill_of_a_ray_run_during_download_loses_nothing(tmp_path, small_data):
    work = tmp_path / "w"
    proc = _demo_download(work)
    deadline = time.time() + 240
    while time.time() < deadline and not list((work / "download").glob("0*.tar")):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.05)
    assert list((work / "download").glob("0*.tar")), "download never started"
    os.kill(proc.pid, signal.SIGKILL)                     # the driver only: its Ray workers live on a moment
    proc.wait()
    time.sleep(3)
    _kill_group(proc.pid)                                 # what is left of that Ray instance
    assert not (work / "download" / "_DONE").exists()
    finals = {p.name: json.loads(p.read_text()) for p in (work / "download").glob("*_verdict.json")}
    assert all(v["failed_transient"] == 0 for v in finals.values()), finals  # no shard made final by the kill

    rerun = _demo_download(work)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out[-3000:]
    stats = json.loads((work / "download" / "stats.json").read_text())
    assert stats["successes"] == small_data.table.num_rows == 300, stats
    assert stats["failed_transient"] == 0 and stats["failed_permanent"] == 0 and stats["samples_lost"] == 0


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
