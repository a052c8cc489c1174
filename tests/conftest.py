"""Shared fixtures: one Ray (num_cpus=2) per session, and one small demo run whose outputs most tests read."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CIDISTILL_TEST", "1")

SLOW_MODULES = {"test_kill_resume", "test_multinode", "test_card_browser", "test_download_kill"}


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
    """The README's main job at test size: `cidistill demo --small` into a fresh work folder."""
    from cidistill.app.cli import main
    from cidistill.app.demo import demo_config

    workdir = tmp_path_factory.mktemp("demo-small")
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
