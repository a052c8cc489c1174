"""Shared fixtures: one Ray (num_cpus=2) per session, and one small demo run whose outputs most tests read."""
from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("CIDISTILL_TEST", "1")

def free_port() -> int:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


# The object-store tier talks to moto's S3 server on loopback (started by the `s3` fixture). Its endpoint and
# test credentials are set before anything starts Ray, so that every Ray worker inherits them.
S3_PORT = free_port()
S3_TEST_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "FSSPEC_S3_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}"}
os.environ.update(S3_TEST_ENV)

# Ray's log monitor copies its own processes' lines into the driver's stderr at any moment, also while a test
# checks a `--no-ray` command's one-line error (CI: "(raylet) … /tmp/ray/… is over 95% full" on a nearly full
# disk, from the session's Ray). Those lines are Ray's, not the CLI's: tests of the CLI's messages read around them.
RAY_FORWARDED = re.compile(r"^\((raylet|gcs_server|autoscaler|dashboard)\b|^\(.*?\bpid=\d+[,)]")


def cli_stderr(capsys) -> str:
    """What the CLI wrote to stderr since the last read, without the lines Ray forwarded from its processes."""
    err = capsys.readouterr().err
    return "\n".join(ln for ln in err.splitlines() if not RAY_FORWARDED.match(ln)).strip()


SLOW_MODULES = {"test_kill_resume", "test_multinode", "test_card_browser", "test_download_kill", "test_object_store"}


def pytest_collection_modifyitems(items):
    """Three tiers: `slow` (kill/resume, multi-node, browser), `integration` (reads the small demo run),
    `unit` (the rest: no demo data). `pytest -m "not slow"` is the quick run."""
    for item in items:
        if item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
        elif "small_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def ray_session():
    from cidistill.core.runtime import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_data():
    from cidistill.app.demo_data import build_demo_data

    return build_demo_data(small=True)


@pytest.fixture(scope="session")
def small_run(ray_session, tmp_path_factory):
    """The README's main job at test size: `cidistill demo --small` into a fresh work folder, named as a user
    may name one (fsspec reads `[1]` as a glob pattern, YAML reads ` #` as a comment: each stage must not)."""
    from cidistill.app.cli import main
    from cidistill.app.demo import demo_config

    workdir = tmp_path_factory.mktemp("demo-small") / "run [1] #2"
    assert main(["demo", "--small", "--workdir", str(workdir)]) == 0
    cfg = demo_config(str(workdir), small=True)
    from cidistill.core.store import Store

    cfg.teacher.pretrained = Store(str(workdir / "embed")).read_json("_DONE")["fields"]["teacher.pretrained"]
    return cfg


@pytest.fixture()
def server(small_data):
    from cidistill.app.demo_data import LoopbackServer

    with LoopbackServer(small_data.root) as srv:
        yield srv


def start_moto(port: int, env: dict | None = None):
    """moto's standalone S3 server on 127.0.0.1:port (the way s3fs's own tests run one)."""
    import subprocess
    import sys
    import time
    import urllib.request

    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dict(os.environ, **(env or {})))
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("moto server did not start")


@pytest.fixture(scope="session")
def s3():
    """A real S3 API on loopback for the session: returns the endpoint URL; buckets are made by each test."""
    import fsspec

    proc = start_moto(S3_PORT)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = S3_TEST_ENV["FSSPEC_S3_ENDPOINT_URL"]
    yield S3_TEST_ENV["FSSPEC_S3_ENDPOINT_URL"]
    proc.terminate()
    proc.wait(10)
