"""Trainer: resume reaches the same weights; a 2-worker Ray Train run works on CPU."""
import dataclasses
import json

import torch
from safetensors.torch import load_file

from kd.train import latest_checkpoint, train
from pipeline.config import PhaseConfig


def _cfg(small_run, steps=6):
    return dataclasses.replace(small_run, train=dataclasses.replace(
        small_run.train, batch_size=16, ckpt_every=2, log_every=1,
        phases=[PhaseConfig(steps=2, losses={"feature_distill": 1.0}),
                PhaseConfig(steps=steps - 2, losses={"cluster": 0.5, "instance": 1.0, "align": 0.5})]))


def test_resume_reaches_same_weights(small_run, tmp_path):
    cfg = _cfg(small_run)
    train(cfg, str(tmp_path / "a"), use_ray=False)
    train(cfg, str(tmp_path / "b"), use_ray=False, stop_after=3)   # "killed" after step 3 (checkpoint at 2)
    assert latest_checkpoint(tmp_path / "b").name == "step-0000002"
    train(cfg, str(tmp_path / "b"), use_ray=False)                 # resumes from step 2
    a = load_file(latest_checkpoint(tmp_path / "a") / "model.safetensors")
    b = load_file(latest_checkpoint(tmp_path / "b") / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert {"feature_distill"} <= set(log[0]) and {"cluster", "instance", "align", "lr", "samples_per_s"} <= set(log[-1])


def test_two_worker_ray_train(small_run, ray_session, tmp_path):
    cfg = _cfg(small_run, steps=4)
    cfg.train.workers = 2
    cfg.train.threads = 1
    r = train(cfg, str(tmp_path / "ddp"), use_ray=True)
    assert r["steps"] == 4 and latest_checkpoint(tmp_path / "ddp").name == "step-0000004"
