"""Trainer: resume reaches the same weights; a 2-worker Ray Train run works on CPU."""
import dataclasses
import json
import os
from pathlib import Path

import pytest
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


@pytest.fixture(scope="module")
def uninterrupted(small_run, tmp_path_factory) -> Path:
    """The 6-step run the resume tests end on: trained once for the module."""
    out = tmp_path_factory.mktemp("uninterrupted") / "a"
    train(_cfg(small_run), str(out), use_ray=False)
    return out


def test_resume_reaches_same_weights(small_run, uninterrupted, tmp_path):
    cfg = _cfg(small_run)
    train(cfg, str(tmp_path / "b"), use_ray=False, stop_after=3)   # "killed" after step 3 (checkpoint at 2)
    b_out = Store(str(tmp_path / "b"))
    assert latest_checkpoint(b_out) == "step-0000002"
    position = b_out.read_json("step-0000002/meta.json")["data_position"]
    assert [p["epoch"] for p in position] == [0, 0] and all(p["in_block"] == 2 * 8 for p in position)  # mid-epoch
    train(cfg, str(tmp_path / "b"), use_ray=False)                 # resumes from step 2
    a_out = Store(str(uninterrupted))
    a, b = load_weights(a_out, latest_checkpoint(a_out)), load_weights(b_out, latest_checkpoint(b_out))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log = [json.loads(l) for l in (uninterrupted / "log.jsonl").read_text().splitlines()]
    assert {"feature_distill"} <= set(log[0]) and {"cluster", "instance", "align", "lr", "samples_per_s"} <= set(log[-1])


def test_a_damaged_checkpoint_is_passed_over_for_the_one_before_it(small_run, uninterrupted, tmp_path, capsys):
    """A checkpoint cut short (a copy of the work folder that stopped, a lost file) failed the resume with a
    SafetensorError or unpickler traceback. The one before it is used instead, and the run still ends on the
    uninterrupted run's weights; with none readable, one line, and no training silently started over."""
    from cidistill.core.errors import StageError

    cfg = _cfg(small_run)
    train(cfg, str(tmp_path / "b"), use_ray=False, stop_after=5)  # checkpoints at 2 and 4
    state = tmp_path / "b" / "step-0000004" / "state.pt"
    state.write_bytes(state.read_bytes()[:100])
    capsys.readouterr()
    train(cfg, str(tmp_path / "b"), use_ray=False)
    out = capsys.readouterr().out
    assert "[train] checkpoint step-0000004 cannot be read (" in out and "); resuming from step-0000002" in out
    a_out, b_out = Store(str(uninterrupted)), Store(str(tmp_path / "b"))
    a, b = load_weights(a_out, latest_checkpoint(a_out)), load_weights(b_out, latest_checkpoint(b_out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    train(cfg, str(tmp_path / "c"), use_ray=False, stop_after=3)  # one checkpoint, at 2, its weights file cut
    weights = tmp_path / "c" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(StageError, match=r"^no checkpoint in .*/c can be read \(step-0000002: .*\): rerun with --force"):
        train(cfg, str(tmp_path / "c"), use_ray=False)


def _losses(folder):
    return [json.loads(l) for l in (folder / "log.jsonl").read_text().splitlines()]


def test_two_workers_follow_the_one_worker_loss_curve(small_run, ray_session, tmp_path, monkeypatch):
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
    # its inputs by relative paths (`workdir: runs/x`): Ray Train starts its workers in its own run folder
    monkeypatch.chdir(Path(small_run.workdir))
    cfg.dirs = {**cfg.dirs, "pack": os.path.relpath(small_run.stage_dir("pack")),
                "cluster": os.path.relpath(small_run.stage_dir("cluster"))}
    two = train(cfg, str(tmp_path / "two"), use_ray=True)
    assert one["steps"] == two["steps"] == 6 and latest_checkpoint(Store(str(tmp_path / "two"))) == "step-0000006"
    a, b = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    for ra, rb in zip(a, b):
        for term in ("feature_distill", "instance", "align", "cluster"):
            if term in ra:
                assert abs(ra[term] - rb[term]) <= 0.005 * abs(ra[term]), (term, ra, rb)

def test_a_lit_teachers_locked_features_are_computed_once_and_resume_exactly(small_run, tmp_path):
    """The locked trunk's features come from one pass over the distinct training captions: equal to the per-batch
    computation (fp32), a caption outside them computed when it comes; a LiT run killed mid-way resumes to the
    same weights as an uninterrupted one."""
    from cidistill.core.models import DEMO_TEACHER, create
    from kd.data import manifest_texts
    from kd.train import LockedText, locked_text_features

    root = small_run.stage_dir("pack")
    lm = create(DEMO_TEACHER)
    texts = list(manifest_texts(root, "train", False))
    locked = LockedText(lm.model, texts, lm.tokenizer)
    assert len(locked.row) == len(set(texts)) < len(texts)  # the styles share captions
    batch = lm.tokenizer(texts[:24] + ["a caption no training pair has"])
    assert (locked(batch) - locked_text_features(lm.model, batch)).abs().max() < 1e-5

    cfg = dataclasses.replace(
        small_run, student=dataclasses.replace(small_run.student, model=DEMO_TEACHER, pretrained="", trim_vocab=False,
                                               text_from_teacher=0),
        train=dataclasses.replace(small_run.train, batch_size=16, ckpt_every=2, log_every=1, style_augment=False,
                                  phases=[PhaseConfig(steps=4, losses={"clip": 1.0})]))
    train(cfg, str(tmp_path / "a"), use_ray=False, lock_text=True, chinese=False)
    train(cfg, str(tmp_path / "b"), use_ray=False, lock_text=True, chinese=False, stop_after=3)
    train(cfg, str(tmp_path / "b"), use_ray=False, lock_text=True, chinese=False)  # resumes from step 2
    a_out, b_out = Store(str(tmp_path / "a")), Store(str(tmp_path / "b"))
    a, b = load_weights(a_out, latest_checkpoint(a_out)), load_weights(b_out, latest_checkpoint(b_out))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
