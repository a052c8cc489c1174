"""Trainer: resume reaches the same weights; a 2-worker Ray Train run works on CPU."""
import dataclasses
import json

import torch

from kd.checkpoint import latest_checkpoint, load_weights
from kd.train import train
from cidistill.core.config import PhaseConfig
from cidistill.core.store import Store


def _cfg(small_run, steps=6):
    return dataclasses.replace(small_run, train=dataclasses.replace(
        small_run.train, batch_size=16, ckpt_every=2, log_every=1,
        phases=[PhaseConfig(steps=2, losses={"feature_distill": 1.0}),
                PhaseConfig(steps=steps - 2, losses={"cluster": 0.5, "instance": 1.0, "align": 0.5})]))


def test_resume_reaches_same_weights(small_run, tmp_path):
    cfg = _cfg(small_run)
    train(cfg, str(tmp_path / "a"), use_ray=False)
    train(cfg, str(tmp_path / "b"), use_ray=False, stop_after=3)   # "killed" after step 3 (checkpoint at 2)
    b_out = Store(str(tmp_path / "b"))
    assert latest_checkpoint(b_out) == "step-0000002"
    position = b_out.read_json("step-0000002/meta.json")["data_position"]
    assert [p["epoch"] for p in position] == [0, 0] and all(p["in_block"] == 2 * 8 for p in position)  # mid-epoch
    train(cfg, str(tmp_path / "b"), use_ray=False)                 # resumes from step 2
    a_out = Store(str(tmp_path / "a"))
    a, b = load_weights(a_out, latest_checkpoint(a_out)), load_weights(b_out, latest_checkpoint(b_out))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(l) for l in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert {"feature_distill"} <= set(log[0]) and {"cluster", "instance", "align", "lr", "samples_per_s"} <= set(log[-1])


def _losses(folder):
    return [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines()]


def test_two_workers_follow_the_one_worker_loss_curve(small_run, ray_session, tmp_path):
    """Same global batch: Ray Train over 2 gloo workers (features gathered across them) vs one worker, fp32.
    The student is a BatchNorm-free ViT: a ResNet's BatchNorm normalises over each worker's half batch (no
    SyncBatchNorm on CPU), which alone moved the instance and cluster terms by 3–9 %. Its own text tower has
    no dropout either (the demo's teacher-cut BERT layers do: each worker draws masks for its half batch).
    Without them every term, the cluster term included, must agree closely at every step."""
    cfg = _cfg(small_run, steps=6)
    cfg.student = dataclasses.replace(cfg.student, model="cid-tiny-vit", text_from_teacher=0)
    cfg.train.batch_size, cfg.train.threads, cfg.train.precision = 32, 1, "fp32"
    cfg.train.streams = 2  # the batch sequence depends on the streams, not on the workers that read them
    one = train(cfg, str(tmp_path / "one"), use_ray=False)
    cfg.train.workers, cfg.train.loader_workers = 2, 1
    two = train(cfg, str(tmp_path / "two"), use_ray=True)
    assert one["steps"] == two["steps"] == 6 and latest_checkpoint(Store(str(tmp_path / "two"))) == "step-0000006"
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for term in ("feature_distill", "instance", "align", "cluster"):
            if term in ra:
                assert abs(ra[term] - rb[term]) <= 0.005 * abs(ra[term]), (term, ra, rb)