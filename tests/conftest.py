"""Shared fixtures: one Ray (num_cpus=2) per session, and one small demo run whose outputs most tests read."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("CIDISTILL_TEST", "1")


@pytest.fixture(scope="session")
def ray_session():
    from pipeline.runtime import init_ray

    ray = init_ray(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_data():
    from pipeline.demo_data import build_demo_data

    return build_demo_data(small=True)


@pytest.fixture(scope="session")
def small_run(ray_session, tmp_path_factory):
    """The README's main job at test size: `cidistill demo --small` into a fresh work folder."""
    from pipeline.cli import main
    from pipeline.demo import demo_config

    workdir = tmp_path_factory.mktemp("demo-small")
    assert main(["demo", "--small", "--workdir", str(workdir)]) == 0
    cfg = demo_config(str(workdir), small=True)
    from pipeline.stage import Store

    cfg.teacher.pretrained = Store(str(workdir / "embed")).read_json("_DONE")["config"]["teacher"]["pretrained"]
    return cfg


@pytest.fixture()
def server(small_data):
    from pipeline.demo_data import LoopbackServer

    with LoopbackServer(small_data.root) as srv:
        yield srv
