"""What a user types wrong gets one line on stderr and exit 2 (3 for a full disk), never a traceback."""
import json
import subprocess
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cidistill.app.cli import main
from cidistill.core.config import ConfigError, load_config, to_dict
from conftest import RAY_FORWARDED, cli_stderr


def _err(capsys) -> str:
    err = cli_stderr(capsys)
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_yaml_syntax_error_names_file_and_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: 3\n  phases: [\n")
    assert main(["balance", "-c", str(p)]) == 2
    err = _err(capsys)
    assert str(p) in err and "not valid YAML" in err and "line" in err
    binary = tmp_path / "urls.parquet"  # the URL list given where the config goes: a UnicodeDecodeError traceback
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.png"]}), binary)
    for argv in (["config", "--check", str(binary)], ["run", str(binary)]):
        assert main(argv) == 2
        assert _err(capsys).startswith(f"cidistill: error: {binary}: not a YAML config file (not UTF-8 text: byte ")


def test_a_key_given_twice_is_an_error_not_a_silent_override(tmp_path, capsys):
    """YAML keeps the last of two equal keys: a second `train:` block silently dropped the first's settings."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batch_size: 64\ncluster: {k: 10}\ntrain:\n  lr: 0.01\n")
    assert main(["config", "--check", str(p)]) == 2
    assert _err(capsys).endswith("c.yaml: line 4, column 1 not valid YAML (key 'train' given twice)")
    from cidistill.core.config import load_config  # a merge key and an override of its own still work

    p.write_text("train:\n  <<: {batch_size: 64, lr: 0.01}\n  lr: 0.02\n")
    cfg = load_config(str(p))
    assert (cfg.train.batch_size, cfg.train.lr) == (64, 0.02)


def test_a_config_whose_aliases_expand_to_billions_is_refused_in_one_line(tmp_path, capsys):
    """Nine lines of nested YAML aliases (9^9 values) under the free-form storage_options: `config --check`
    grew without bound until the memory ran out (a MemoryError traceback under a 4 GB limit). A value that
    contains itself, and one nested thousands deep, are one line too; an ordinary alias still works."""
    p = tmp_path / "c.yaml"
    lines = ["storage_options:", "  s3:", "    a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"    a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]
    p.write_text("\n".join(lines) + "\n")
    assert main(["config", "--check", str(p)]) == 2
    assert _err(capsys).endswith("c.yaml: expands to more than 100,000 values (YAML aliases repeated inside each other)")
    p.write_text("storage_options: {s3: &x {a: [*x]}}\n")
    assert main(["config", "--check", str(p)]) == 2
    assert _err(capsys).endswith("c.yaml: a YAML alias refers to a value that contains it")
    p.write_text("storage_options: {s3: {a: " + "[" * 5000 + "]" * 5000 + "}}\n")
    assert main(["config", "--check", str(p)]) == 2
    assert _err(capsys).endswith("c.yaml: nested too deeply to be a config")
    assert main(["config", "--set", "storage_options.s3={a: &a [x, x], b: [*a, *a]}", "secret=&b [*b]"]) == 2
    assert _err(capsys).endswith("override 'secret': a YAML alias refers to a value that contains it")  # key only
    from cidistill.core.config import load_config

    p.write_text("train:\n  phases:\n    - &p {steps: 5, losses: {feature_distill: 1.0}}\n    - *p\n")
    assert [ph.steps for ph in load_config(str(p)).train.phases] == [5, 5]


def test_download_inputs(tmp_path, capsys):
    bad = tmp_path / "urls.parquet"
    bad.write_text("url,caption\nhttp://127.0.0.1/x.png,hi\n")                        # a CSV named .parquet
    assert main(["download", "--workdir", str(tmp_path / "w1"), "--set", f"data.urls={bad}", "--no-ray"]) == 2
    assert "is not a parquet file" in _err(capsys)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"url": pa.array([], pa.string()), "caption": pa.array([], pa.string())}), empty)
    assert main(["download", "--workdir", str(tmp_path / "w2"), "--set", f"data.urls={empty}",
                 "data.extra_cols=[]", "--no-ray"]) == 2
    assert "no URL to download" in _err(capsys)
    assert main(["download", "--workdir", str(tmp_path / "w3"), "--set", "data.samples_per_shard=0"]) == 2
    assert "data.samples_per_shard" in _err(capsys)
    assert main(["download", "--workdir", str(tmp_path / "w4"), "--set", "data.urls=no/such.parquet", "--no-ray"]) == 2
    assert "no URL list (parquet, csv, tsv or jsonl) found at 'no/such.parquet' (relative paths start at the current folder" in _err(capsys)
    numbers = tmp_path / "numbers.parquet"                # captions that are not text
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.png"], "caption": pa.array([7], pa.int64())}), numbers)
    assert main(["download", "--workdir", str(tmp_path / "w5"), "--set", f"data.urls={numbers}", "--no-ray"]) == 2
    assert "data.caption_col 'caption' holds int64 values, not text" in _err(capsys)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workdir: {tmp_path / 'w6'}\n")
    assert main(["run", str(cfg), "--stages", "trian", "--no-ray"]) == 2
    assert "unknown stage(s) ['trian']; known: download embed" in _err(capsys)
    # `cidistill run -c FILE`, as every stage command takes its config, said "arguments are required: run_config"
    assert main(["run", "-c", str(cfg), "--stages", "trian", "--no-ray"]) == 2
    assert "unknown stage(s) ['trian']" in _err(capsys)
    assert main(["run", str(cfg), "-c", str(tmp_path / "other.yaml"), "--no-ray"]) == 2
    assert f"two config files given ('{cfg}' and -c '{tmp_path / 'other.yaml'}'): give one" in _err(capsys)
    assert main(["run", "--no-ray"]) == 2
    assert "cidistill run needs a config file: cidistill run CONFIG (or -c CONFIG)" in _err(capsys)
    with pytest.raises(SystemExit) as e:  # `--stages` with no name ran (with --force: redid) every stage
        main(["run", str(cfg), "--force", "--stages"])
    assert e.value.code == 2 and "argument --stages: expected at least one argument" in capsys.readouterr().err
    # the demo checked its stages only after building its data, then failed on a missing stats.json
    assert main(["demo", "--small", "--workdir", str(tmp_path / "w7"), "--stages", "trian", "--no-ray"]) == 2
    assert "unknown stage(s) ['trian']" in _err(capsys) and not (tmp_path / "w7").exists()
    assert main(["compare", "--variants", "cidd", "--no-ray"]) == 2      # was a ValueError traceback
    assert _err(capsys).startswith("cidistill: error: compare: unknown variant(s) ['cidd']; known: config clip")


def test_a_train_config_that_cannot_train_fails_before_the_last_training_is_cleared(tmp_path, capsys):
    """`--set train.phases=[]` said "config changed; redoing train", deleted the trained student and its
    checkpoints, then failed on `train/None/model.safetensors`."""
    out = tmp_path / "w" / "train"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"the last training")
    for override, msg in (("train.phases=[]", "train.phases: at least one phase (steps and losses) is needed"),
                          ("train.phases.0.losses.feature_distill=0",
                           "train.phases[0].losses: no loss with a weight above 0 ({'feature_distill': 0.0})")):
        assert main(["train", "--workdir", str(tmp_path / "w"), "--set", "train.phases=[{steps: 3, losses: "
                     "{feature_distill: 1.0}}]", override, "--no-ray"]) == 2
        assert _err(capsys).endswith(msg) and (out / "model.safetensors").read_bytes() == b"the last training"


def _copied_run(small_run, tmp_path: Path, stages: tuple[str, ...]) -> Path:
    """The small demo's finished `stages` copied into tmp_path, and a config file for that work folder."""
    import shutil

    for stage in stages:
        shutil.copytree(small_run.stage_dir(stage), tmp_path / stage)
    d = to_dict(small_run)
    d["workdir"], d["dirs"] = str(tmp_path), {}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    return p


def test_a_damaged_marker_is_checked_again_and_a_damaged_input_marker_is_named(tmp_path, small_run, capsys):
    """A work folder copied by a copy that stopped: a `_DONE` cut short was a JSONDecodeError traceback. The
    stage's own marker counts as absent (its units are checked again, nothing redone); a stage run alone whose
    input's marker is damaged names the file in one line."""
    p = _copied_run(small_run, tmp_path, ("download", "embed"))
    done = tmp_path / "embed" / "_DONE"
    intact, shards = done.read_bytes(), {f.name: f.read_bytes() for f in (tmp_path / "embed").glob("0*.parquet")}
    done.write_bytes(intact[: len(intact) // 2])
    assert main(["balance", "-c", str(p), "--no-ray"]) == 2
    err = _err(capsys)
    assert err.startswith(f"cidistill: error: {done} is damaged (not readable JSON: ") and err.endswith(
        "): remove it and rerun (what it marked is redone), or rerun the stage with --force"), err
    assert main(["run", str(p), "--stages", "download", "embed", "--no-ray"]) == 0
    assert "[embed] its _DONE marker is damaged: checking its units again" in capsys.readouterr().out
    assert json.loads(done.read_bytes())["fingerprint"] == json.loads(intact)["fingerprint"]
    assert {f.name: f.read_bytes() for f in (tmp_path / "embed").glob("0*.parquet")} == shards


def test_a_damaged_centroid_file_or_manifest_is_named_in_one_line(tmp_path, small_run, capsys):
    """The same copy that stopped, in the train stage's inputs: a `centroids.npy` or a split's `manifest.parquet`
    cut short was a numpy / pyarrow traceback."""
    p = _copied_run(small_run, tmp_path, ("download", "embed", "balance", "cluster", "pack"))
    for f, msg in (("cluster/centroids.npy", "not a readable .npy array (EOF: reading array data"),
                   ("pack/train/manifest.parquet", "not a readable parquet file (Parquet magic bytes not found")):
        intact = (tmp_path / f).read_bytes()
        (tmp_path / f).write_bytes(intact[: len(intact) // 2])
        assert main(["train", "-c", str(p), "--no-ray"]) == 2
        assert _err(capsys).startswith(f"cidistill: error: {tmp_path / f}: {msg}")
        (tmp_path / f).write_bytes(intact)


def test_a_url_list_typo_fails_before_the_last_download_is_cleared(tmp_path, small_run, capsys):
    """`--set data.urls=` a file that is not parquet (or lacks a column) on a finished download: it said
    "config changed; redoing download, embed, …", deleted every downloaded shard, then failed on the file."""
    p = _copied_run(small_run, tmp_path, ("download",))
    before = sorted(q.name for q in (tmp_path / "download").iterdir())
    no_caption = tmp_path / "no_caption.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1/x.png"]}), no_caption)
    for urls, msg, extra in ((p, "is not a parquet file", []), (no_caption, "missing column(s) ['caption'", []),
                             (p, "is not a parquet file", ["--force"])):
        assert main(["download", "-c", str(p), "--set", f"data.urls={urls}", "--no-ray", *extra]) == 2
        assert msg in _err(capsys)
        assert sorted(q.name for q in (tmp_path / "download").iterdir()) == before  # nothing cleared


def test_a_teacher_checkpoint_of_another_model_fails_before_the_last_embeddings_are_cleared(tmp_path, small_run, capsys):
    """`--set teacher.pretrained=` the student's weights (another model): embed said "config changed", deleted
    every embedding, then each Ray actor died with a KeyError traceback (160 lines). Now the checkpoint's
    names and shapes are checked against the model (a skeleton on the meta device) before anything is cleared."""
    p = _copied_run(small_run, tmp_path, ("download", "embed"))
    before = sorted(q.name for q in (tmp_path / "embed").iterdir())
    student = Path(small_run.stage_dir("train")) / "model.safetensors"
    assert main(["embed", "-c", str(p), "--set", f"teacher.pretrained={student}"]) == 2
    err = _err(capsys)
    assert err.startswith(f"cidistill: error: {student}: weights do not fit the model: visual.") and "\n" not in err
    assert sorted(q.name for q in (tmp_path / "embed").iterdir()) == before  # nothing cleared


def test_a_student_typo_fails_before_the_last_trained_student_is_cleared(tmp_path, small_run, capsys):
    """A finished training rerun with a student that cannot be built (a mistyped model name, weights file or
    config file, more text layers than the teacher has): it said "config changed; redoing train", deleted the
    trained student and its checkpoints, then failed (a nonexistent weights file: a RuntimeError traceback; a
    nonexistent model_config: silently ignored, and the student trained from the packaged config)."""
    p = _copied_run(small_run, tmp_path, ("download", "embed", "balance", "cluster", "pack", "train"))
    before = sorted(q.name for q in (tmp_path / "train").iterdir())
    teacher = small_run.teacher.pretrained.removeprefix("local-dir:") + "/open_clip_model.safetensors"
    for override, msg in ((f"student.model={small_run.student.model}x", "unknown open_clip model"),
                          ("student.pretrained=/no/such.safetensors", "pretrained '/no/such.safetensors' is neither a file nor"),
                          ("student.model_config=/no/such.json", "student.model_config: no such file or folder: '/no/such.json'"),
                          ("student.text_from_teacher=99", "student.text_from_teacher=99: the teacher's text tower has"),
                          (f"student.pretrained={teacher}", "weights do not fit the model: visual.")):
        assert main(["train", "-c", str(p), "--set", override, "--no-ray"]) == 2, override
        err = _err(capsys)
        assert msg in err and "\n" not in err, (override, err)
        assert sorted(q.name for q in (tmp_path / "train").iterdir()) == before, override  # nothing cleared


def test_a_run_checks_every_stages_models_before_the_first_stage_works(tmp_path, small_run, capsys):
    """`cidistill run` with a mistyped teacher or student downloaded everything first (days at web scale) and
    failed at embed or train: the settings of every stage the run will work in are now checked up front."""
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.png"], "caption": ["an x"]}), urls)
    for i, (override, msg) in enumerate((("teacher.pretrained=openai teacher.model=ViT-B-32x",
                                          "unknown open_clip model 'ViT-B-32x'"),
                                         ("student.model=cid-tiny-rnx", "unknown open_clip model 'cid-tiny-rnx'"),
                                         ("student.model_config=/no/such.json", "student.model_config: no such file"))):
        work = tmp_path / f"w{i}"
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(f"workdir: {work}\ndata: {{urls: {urls}}}\nteacher: {{pretrained: '{small_run.teacher.pretrained}'}}\n")
        assert main(["run", str(cfg), "--set", *override.split(), "--no-ray"]) == 2
        assert msg in _err(capsys)
        assert not (work / "download" / "_RUN.json").exists()  # the download never started


def test_onnx_export_without_its_extra_fails_before_the_first_stage(tmp_path, small_run, capsys, monkeypatch):
    """`export.onnx: true` on an install without the `onnx` extra: the run downloaded, embedded and trained, then
    the export failed on `No module named 'onnxruntime'`. Now the run checks it before the first stage."""
    import kd.export

    real = kd.export.find_spec
    monkeypatch.setattr(kd.export, "find_spec", lambda name: None if name == "onnxruntime" else real(name))
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:9/x.png"], "caption": ["an x"]}), urls)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workdir: {tmp_path / 'w'}\ndata: {{urls: {urls}}}\nteacher: {{pretrained: '{small_run.teacher.pretrained}'}}\n"
                   "export: {onnx: true}\n")
    assert main(["run", str(cfg), "--no-ray"]) == 2
    assert _err(capsys) == ("cidistill: error: export.onnx needs onnxruntime, not installed: pip install -c "
                            "constraints.txt '.[onnx]' in the checkout (or set export.onnx: false)")
    assert not (tmp_path / "w" / "download").exists()   # nothing started
    monkeypatch.setattr(kd.export, "find_spec", real)
    kd.export.check_onnx_installed()                      # installed here (run_tests.sh installs the extra)


def test_a_shard_removed_from_a_finished_stage_is_named_not_skipped(tmp_path, small_run, capsys):
    """A download tar (or an embed parquet) removed or moved after its stage finished: the next stage globbed
    what was left and carried on without those pairs (`embed done: 82 pairs embedded` of 132, exit 0)."""
    import shutil

    shutil.copytree(small_run.stage_dir("download"), tmp_path / "download")
    shutil.copytree(small_run.stage_dir("embed"), tmp_path / "embed")
    (tmp_path / "download" / "00001.tar").unlink()
    (tmp_path / "embed" / "00002.parquet").rename(tmp_path / "00002.parquet")
    d = to_dict(small_run)
    d["workdir"], d["dirs"] = str(tmp_path), {}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    assert main(["embed", "-c", str(p), "--force", "--no-ray"]) == 2
    assert _err(capsys).endswith(f"{tmp_path / 'download'} holds 2 shard files (0000N.tar) where its stats.json "
                                 "counts 3: files were removed, moved or added since the stage finished; restore "
                                 "them, or redo that stage with --force")
    assert (tmp_path / "embed" / "_DONE").exists()  # the refused --force cleared nothing
    assert main(["balance", "-c", str(p), "--no-ray"]) == 2
    assert "embed holds 2 shard files (0000N.parquet) where its stats.json counts 3" in _err(capsys)


def _embed_cfg(tmp_path, small_run, **teacher) -> str:
    d = to_dict(small_run)
    d["dirs"] = {"download": small_run.stage_dir("download"), "embed": str(tmp_path / "embed")}
    d["teacher"].update(teacher)
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    return str(p)


@pytest.mark.parametrize("teacher,needle", [
    ({"model": "ViT-Nope-1", "pretrained": "random"}, "unknown open_clip model 'ViT-Nope-1'"),
    ({"model": "ViT-B-32", "pretrained": "laion2b_nope"}, "neither a file nor an open_clip tag of ViT-B-32"),
    ({"model": "ViT-B-32", "pretrained": "/no/such/teacher.safetensors"}, "neither a file nor an open_clip tag"),
    ({"pretrained": ""}, "teacher.pretrained is empty"),
    # open_clip builds a random model from a folder without weights, with only a logged warning
    ({"model": "local-dir:{tmp}/no-weights", "pretrained": ""}, "no-weights: no weights file"),
])
def test_teacher_mistakes_fail_before_any_work(tmp_path, small_run, capsys, teacher, needle):
    if "{tmp}" in teacher.get("model", ""):  # a teacher folder with its config (as exported) and no weights
        import shutil

        folder = tmp_path / "no-weights"
        folder.mkdir()
        shutil.copy(Path(small_run.stage_dir("export")) / "teacher" / "open_clip_config.json", folder)
        teacher = dict(teacher, model=teacher["model"].format(tmp=tmp_path))
    assert main(["embed", "-c", _embed_cfg(tmp_path, small_run, **teacher), "--no-ray"]) == 2
    assert needle in _err(capsys)
    assert not (tmp_path / "embed" / "_DONE").exists()


def test_teacher_weights_that_cannot_be_fetched_fail_in_the_driver_in_one_line(tmp_path, small_run, capsys,
                                                                                   monkeypatch):
    """An open_clip tag with no way to the hub: one line before any actor starts (each Ray actor died with a
    page of hub tracebacks and "Fatal Python error: Aborted"). Offline here, as on a box without internet."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["embed", "-c", _embed_cfg(tmp_path, small_run, model="ViT-B-32", pretrained="openai")]) == 2
    err = _err(capsys)
    assert "the weights of ViT-B-32/openai could not be fetched" in err and "teacher.pretrained" in err
    assert not list((tmp_path / "embed").glob("*.parquet"))


def test_a_teacher_whose_weights_are_cut_short_fails_in_the_driver_in_one_line(tmp_path, small_run, capsys,
                                                                               monkeypatch):
    """A `local-dir:` teacher whose weights file was cut short (a copy that stopped, a damaged cache) failed
    inside each Ray actor, with pages of tracebacks and "actors died during initialization"; the demo used its
    cached teacher so damaged. Now the driver reads the file's header first, and the demo trains it again."""
    import shutil

    import cidistill.app.demo as demo

    teacher = tmp_path / "teacher"
    shutil.copytree(Path(small_run.stage_dir("export")) / "teacher", teacher)
    with open(teacher / "open_clip_model.safetensors", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    assert main(["embed", "-c", _embed_cfg(tmp_path, small_run, model=f"local-dir:{teacher}", pretrained="")]) == 2
    err = _err(capsys)
    assert err.endswith("open_clip_model.safetensors: not a readable safetensors file (Error while deserializing "
                        "header: incomplete metadata, file not fully covered)") and len(err.splitlines()) == 1, err
    assert not list((tmp_path / "embed").glob("*.parquet"))

    monkeypatch.setenv("CIDISTILL_CACHE", str(tmp_path / "cache"))
    cfg = small_run
    final = demo.teacher_recipe(cfg, True)[1]
    assert str(final).startswith(str(tmp_path / "cache"))
    shutil.copytree(teacher, final)

    def stop(*a, **k):  # the retraining itself is the demo's (its tests train it); here only the decision
        raise RuntimeError("retraining")

    monkeypatch.setattr(demo, "pack_dataset", stop)
    with pytest.raises(RuntimeError, match="retraining"):
        demo.ensure_teacher(cfg, True, use_ray=False)
    assert "[teacher] the cached teacher is damaged (" in capsys.readouterr().out and not final.exists()


def test_pickle_teacher_refused_in_one_line_under_ray(tmp_path, small_run, capsys):
    """Refused inside a Ray actor: the user sees the cause in one line, and never advice to turn the check off."""
    import torch

    from tests.test_bad_inputs import _Evil

    torch.save({"w": _Evil(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    cfg = _embed_cfg(tmp_path, small_run, model="cid-tiny-rn", pretrained=str(tmp_path / "evil.pt"))
    assert main(["embed", "-c", cfg]) == 2
    err = _err(capsys)
    assert "refused by weights-only loading" in err and "weights_only=False" not in err
    assert not (tmp_path / "pwned").exists()


def test_disk_full_while_checkpointing_is_the_exit_3_message(tmp_path, small_run, capsys, monkeypatch):
    """A 6 MB tmpfs holds the run's small files but not the first checkpoint (where mounting is not allowed,
    the checkpoint's weight files fail with ENOSPC instead)."""
    import errno
    from pathlib import Path

    out = tmp_path / "full"
    out.mkdir()
    mounted = not subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(out)],
                                 capture_output=True).returncode
    if not mounted:
        real = Path.write_bytes

        def enospc(self, data):
            if str(self).startswith(str(out)) and self.suffix == ".safetensors":
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real(self, data)

        monkeypatch.setattr(Path, "write_bytes", enospc)
    try:
        d = to_dict(small_run)
        d["dirs"] = {"train": str(out)}
        d["train"]["ckpt_every"] = 1
        p = tmp_path / "cfg.yaml"
        p.write_text(yaml.safe_dump(d, allow_unicode=True))
        assert main(["train", "-c", str(p), "--no-ray"]) == 3
        err = _err(capsys)
        assert "stage 'train'" in err and "No space left on device" in err
        assert not (out / "_DONE").exists()
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)


@pytest.mark.parametrize("sig, ray, to, rc, said", [
    ("SIGINT", False, "group", 130, "interrupted"),  # Ctrl-C: the terminal signals the whole process group
    # `kill PID`, a scheduler stopping the job; under Ray, whose ray.init installs a bare sys.exit(15)
    ("SIGTERM", True, "pid", 143, "stopped by SIGTERM"),
    # `timeout` signals the process, then its group: the data loader processes get it too (one killed by it made
    # the trainer raise "DataLoader worker ... is killed by signal: Terminated"), and the second SIGTERM killed
    # the cleaning-up run silently (the lock left behind)
    ("SIGTERM", False, "timeout", 143, "stopped by SIGTERM")])
def test_ctrl_c_or_sigterm_is_one_line_and_the_rerun_resumes(tmp_path, small_run, sig, ray, to, rc, said):
    """SIGINT (Ctrl-C) or SIGTERM mid-training, to the process or its whole group: one line naming the stage,
    exit 130 (143), the lock released, a checkpoint kept; the rerun resumes from it (once: the Ray run's)."""
    import os
    import signal
    import sys
    import time

    d = to_dict(small_run)
    out, work = tmp_path / "train", tmp_path / "work"
    d["workdir"] = str(work)  # its own lock; the curated inputs are the small run's
    d["dirs"] = {**{s: small_run.stage_dir(s) for s in ("download", "embed", "balance", "cluster", "pack")},
                 "train": str(out)}
    d["train"]["ckpt_every"] = 1
    # 12 steps: the stop lands at step 2-5 (~0.5 s a step here, 0.25 s on a fast box); the rerun trains the rest
    for phase, steps in zip(d["train"]["phases"], (3, 9)):
        phase["steps"] = steps
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    cmd = [sys.executable, "-m", "cidistill", "train", "-c", str(p)] + ([] if ray else ["--no-ray"])
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    # a shell's background job (nohup, `&`) starts with SIGINT ignored, and Python then keeps it ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL), start_new_session=to != "pid")
    deadline = time.time() + 240
    while not list(out.glob("step-*/meta.json")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()
    time.sleep(1)  # a step or two with the loaders busy
    if to != "group":
        os.kill(proc.pid, getattr(signal, sig))
        time.sleep(0.05)  # `timeout` sends the second at once; here the first one's handler has had time to run
    if to != "pid":
        os.killpg(proc.pid, getattr(signal, sig))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rc, err
    said_last = [ln for ln in err.splitlines() if ln.strip() and not RAY_FORWARDED.match(ln)][-1]
    assert "Traceback" not in err and said_last == (
        f"cidistill: {said} during stage 'train'; finished work is kept: run the same command again to resume"), err
    assert not (work / "_LOCK.json").exists() and not (out / "_DONE").exists()
    assert list(out.glob("step-*/meta.json"))  # the checkpoint a rerun resumes from
    if ray:  # a stopped run leaves the same behind however it was stopped: what a run under Ray left resumes
        # (without Ray here: resuming under Ray after a lost node is the two-node test's)
        rerun = subprocess.run(cmd + ["--no-ray"], capture_output=True, text=True, env=env, timeout=600)
        assert rerun.returncode == 0, rerun.stderr
        assert "resum" in rerun.stdout + rerun.stderr and (out / "_DONE").exists()


def test_a_sigterm_whose_exception_a_library_lost_still_stops_the_run(tmp_path, small_run, monkeypatch, capsys):
    """The handler's exception can be lost (C code that checks for signals and clears the error it got): a
    `cidistill train` under Ray once ran to its end with exit 0 after a SIGTERM. The stop is recorded apart from
    the exception, and the training loop looks at it after each step."""
    import signal
    import time

    import kd.train
    from cidistill.app import cli
    from cidistill.core import errors
    from cidistill.core.errors import ask_stop

    d = to_dict(small_run)
    out = tmp_path / "train"
    d["workdir"] = str(tmp_path / "work")
    d["dirs"] = {**{s: small_run.stage_dir(s) for s in ("download", "embed", "balance", "cluster", "pack")},
                 "train": str(out)}
    d["train"].update(ckpt_every=1, phases=[{"steps": 4, "losses": {"feature_distill": 1.0}}])
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    real_step, steps = kd.train.train_step, []

    def step_then_lost_sigterm(w, step, *args):
        steps.append(step)
        if step == 1:  # what the handler records; its exception never arrives
            cli._terminated.append(time.monotonic())
            ask_stop()
        return real_step(w, step, *args)

    monkeypatch.setattr(kd.train, "train_step", step_then_lost_sigterm)
    monkeypatch.setattr(cli, "_terminated", [])
    handler = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["train", "-c", str(p), "--no-ray"]) == 143
    finally:
        signal.signal(signal.SIGTERM, handler)  # a stopped command leaves its own in place
    assert not errors._stop_asked.is_set()  # library code run after the command is not stopped
    assert steps == [0, 1] and [c.name for c in out.glob("step-*")] == ["step-0000001"]  # stopped after its step
    assert cli_stderr(capsys).endswith("cidistill: stopped by SIGTERM during stage 'train'; finished work is kept: "
                                       "run the same command again to resume")


def test_a_ray_address_where_no_cluster_listens_is_one_line_in_seconds(tmp_path):
    """`--ray-address` (or RAY_ADDRESS) with a typo: ray.init waited on it for minutes, printing its retries."""
    import os
    import sys
    import time

    from conftest import free_port

    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "cidistill", "download", "--workdir", str(tmp_path / "w"),
                        "--ray-address", f"127.0.0.1:{free_port()}"], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert r.returncode == 2 and time.time() - t0 < 60, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "no Ray cluster answers there (Connection refused)" in err, err


def test_only_write_failures_read_as_a_full_disk(tmp_path, capsys, monkeypatch):
    """Exit 3 and "free space or fix permissions" for ENOSPC/EACCES-like errors only; a connection reset (an
    object store, a Ray node) is exit 2 with its own words."""
    import errno

    import cidistill.app.cli as cli

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"workdir: {tmp_path / 'w'}\n")
    for exc, rc, needle in ((ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), 2, "Connection reset"),
                            (OSError(errno.ENOSPC, "No space left on device"), 3, "free space or fix permissions")):
        def fail(*a, exc=exc, **k):
            raise exc
        monkeypatch.setattr(cli, "run_stages", fail)
        assert main(["run", str(cfg), "--no-ray"]) == rc
        err = _err(capsys)
        assert needle in err and (rc == 3) == ("free space" in err), err


@pytest.mark.parametrize("stage,needle", [
    ("embed", "embed needs a finished download stage"), ("balance", "balance needs a finished embed stage"),
    ("cluster", "cluster needs a finished balance stage"), ("pack", "pack needs a finished download stage"),
    ("train", "train needs a finished pack stage"), ("eval", "eval needs a finished pack stage"),
    ("export", "export needs a finished train stage"), ("card", "card needs a finished download stage"),
])
def test_a_stage_run_before_its_inputs_says_what_to_run(tmp_path, capsys, stage, needle):
    """(The card rendered an empty card of nothing and marked itself done; eval and export said "no trained
    student" after writing their _RUN.json; every stage's folder was made, a typo in --workdir left a tree.)"""
    assert main([stage, "--workdir", str(tmp_path / "w"), "--no-ray"]) == 2
    assert needle in _err(capsys)
    assert [p.name for p in (tmp_path / "w").rglob("*")] == []   # nothing written, no folder made


def test_a_file_given_as_the_work_folder_is_named_as_a_file(tmp_path, capsys):
    """`--workdir urls.parquet` (a file where the folder goes) said `FileExistsError: [Errno 17] File exists`."""
    (tmp_path / "urls.parquet").write_bytes(b"PAR1")
    assert main(["eval", "--workdir", str(tmp_path / "urls.parquet"), "--no-ray"]) == 2
    assert _err(capsys) == f"cidistill: error: cannot use {tmp_path}/urls.parquet: {tmp_path}/urls.parquet is a file, not a folder"
    assert (tmp_path / "urls.parquet").read_bytes() == b"PAR1"


def test_resources_the_local_cluster_can_never_give_fail_at_once(tmp_path, small_run, capsys):
    """More actors or training workers than the local cluster's CPUs (or a GPU on a CPU box): Ray's actor pool
    waited for ever without a word, Ray Train retried with a page of tracebacks a minute. One line, no work."""
    from cidistill.core.errors import StageError
    from cidistill.core.runtime import require_resources

    assert main(["embed", "-c", _embed_cfg(tmp_path, small_run, num_actors=3, cpus_per_actor=1.0)]) == 2
    assert ("teacher.num_actors=3 × (teacher.cpus_per_actor=1) does not fit in this Ray cluster (2 CPU on 1 node(s)); "
            "ask for less") in _err(capsys)
    assert not list((tmp_path / "embed").glob("*.parquet"))
    # two actors of one CPU fit, but leave no CPU for the tasks that read and decode their images: a deadlock
    assert main(["embed", "-c", _embed_cfg(tmp_path, small_run, num_actors=2, cpus_per_actor=1.0)]) == 2
    assert ("teacher.num_actors=2 × (teacher.cpus_per_actor=1) leaves 0 of the Ray cluster's 2 CPUs to the tasks "
            "that feed it, which need 1; ask for less") in _err(capsys)
    d = to_dict(small_run)
    d["dirs"] = {**{s: small_run.stage_dir(s) for s in ("download", "embed", "balance", "cluster", "pack")},
                 "train": str(tmp_path / "train")}
    d["train"].update(workers=4, streams=4)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(d, allow_unicode=True))
    assert main(["train", "-c", str(tmp_path / "t.yaml")]) == 2
    assert "train.workers=4 × (train.cpus_per_worker=1) does not fit in this Ray cluster" in _err(capsys)
    with pytest.raises(StageError, match=r"a GPU each: train.use_gpu\) does not fit in this Ray cluster \(2 CPU, 0 GPU"):
        require_resources({"CPU": 1, "GPU": 1}, 1, "train.workers=1 × (train.cpus_per_worker=1, a GPU each: train.use_gpu)")
    require_resources({"CPU": 1, "GPU": 0}, 2, "two of one CPU fit in two")


def test_a_user_without_a_writable_home_is_told_to_set_cidistill_cache(tmp_path, monkeypatch, capsys):
    """A container's user often has no home to write in: the cache folder said so as a misleading "stage 'none'
    could not write its output", then npm's own cache in ~/.npm failed the demo data with a traceback, and
    matplotlib warned twice. With CIDISTILL_CACHE set, nothing else needs the home folder."""
    import os
    import tempfile

    from cidistill.app.demo_packages import fetch_package
    from cidistill.core import runtime
    from cidistill.core.errors import StageError

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("HOME", str(blocker / "home"))  # a file is in the way: not even root can make it
    for var in ("XDG_CACHE_HOME", "CIDISTILL_CACHE", "MPLCONFIGDIR", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(runtime, "_checked_caches", set())
    assert main(["demo", "--small", "--workdir", str(tmp_path / "w")]) == 2
    err = _err(capsys)
    assert err.startswith(f"cidistill: error: the cache folder {blocker}/home/.cache/cidistill cannot be written")
    assert err.endswith("set CIDISTILL_CACHE to a writable folder"), err

    runtime.set_env_defaults()
    assert os.environ["MPLCONFIGDIR"].startswith(tempfile.gettempdir())
    with pytest.raises(StageError, match=r"^`npm pack cldr-annotations-full@0.0.0-none` .* failed: npm"):
        fetch_package("cldr-annotations-full", "0.0.0-none", tmp_path / "packages")  # no such version
    assert (tmp_path / "packages" / "npm-cache").is_dir()  # npm's cache was ours, not the missing home's


def test_the_demo_packages_come_down_with_the_standard_library_alone(tmp_path):
    """setup_and_demo.sh fetches the demo's npm packages with the system's python3 while pip installs: the module
    must import with no third-party package (python -S: no site-packages at all), and with the packages already
    on disk it fetches nothing."""
    import sys

    root = Path(__file__).resolve().parents[1]
    code = "import sys, cidistill.app.demo_packages; print(sorted(m for m in ('numpy', 'pyarrow', 'torch', 'yaml') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=root, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-2000:]
    from cidistill.app.demo_packages import PACKAGES

    for name, version in PACKAGES.items():  # as if fetched: .complete marks each unpacked package
        (tmp_path / "demo" / "packages" / f"{name}-{version}").mkdir(parents=True)
        (tmp_path / "demo" / "packages" / f"{name}-{version}" / ".complete").touch()
    env = {"PATH": "/nonexistent", "CIDISTILL_CACHE": str(tmp_path), "HOME": str(tmp_path)}  # no npm reachable
    done = subprocess.run([sys.executable, "-S", "-m", "cidistill.app.demo_packages"], cwd=root, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and not done.stderr, done.stderr
    (tmp_path / "demo" / "packages" / f"cldr-annotations-full-{PACKAGES['cldr-annotations-full']}" / ".complete").unlink()
    failed = subprocess.run([sys.executable, "-S", "-m", "cidistill.app.demo_packages"], cwd=root, env=env,
                            capture_output=True, text=True)
    assert failed.returncode == 1 and failed.stderr.startswith("cidistill: the demo data needs `npm`"), failed.stderr


def test_an_install_stopped_while_making_the_venv_is_made_again_and_a_failed_pip_is_not_marked_done(tmp_path):
    """Ctrl-C during the first command's first seconds left a .venv with no pip in it: every rerun then failed
    the same way. And a pip that failed was hidden whenever an earlier install still imported (its exit status
    went into a pipe): the install was marked done without the packages. Here pip's index is a dead address."""
    import os
    import shutil
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "scripts").mkdir()
    for f in ("scripts/install.sh", "pyproject.toml", "constraints.txt"):
        shutil.copy(root / f, tmp_path / f)
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update(PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1",
               PIP_RETRIES="0", PIP_TIMEOUT="2", PATH=f"{Path(base).parent}:{env['PATH']}")
    out = subprocess.run(["bash", "-c", "source scripts/install.sh cpu"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"{tmp_path}/.venv is incomplete (no pip in it): making it again" in out.stdout
    assert out.stderr.rstrip().endswith("cidistill: pip could not install torch (its messages are above)"), out.stderr
    assert subprocess.run([str(tmp_path / ".venv/bin/python"), "-m", "pip", "--version"], capture_output=True).returncode == 0
    assert not list(tmp_path.glob(".venv-installed-*"))


def test_a_console_and_locale_that_are_not_utf8_neither_end_a_run_nor_change_a_file(tmp_path, small_run):
    """LC_ALL=C with Python's UTF-8 mode off (or a Latin-1 locale): the export died on its README's `→`
    (UnicodeEncodeError: text files were written in the locale's encoding), and `cidistill config` on its first
    Chinese prompt template. Files are UTF-8 whatever the locale; the console gets escapes for what it lacks, and
    `cidistill config`'s YAML then uses YAML's own escapes, so that it still loads back as the defaults."""
    import os
    import sys

    from cidistill.core.config import Config

    d = to_dict(small_run)
    d["dirs"] = {s: small_run.stage_dir(s) for s in ("train", "eval")} | {"export": str(tmp_path / "export")}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d, allow_unicode=True), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "LANG", "PYTHONIOENCODING"))}
    env.update(LC_ALL="C", LANG="C", PYTHONUTF8="0")
    run = [sys.executable, "-m", "cidistill"]
    out = subprocess.run(run + ["config"], env=env, capture_output=True, timeout=300)
    assert out.returncode == 0 and out.stdout.isascii() and b"templates_zh" in out.stdout, out.stderr[-2000:]
    (tmp_path / "printed.yaml").write_bytes(out.stdout)
    assert load_config(str(tmp_path / "printed.yaml")) == Config().validate()
    out = subprocess.run(run + ["export", "-c", str(tmp_path / "c.yaml"), "--no-ray"], env=env, capture_output=True,
                         timeout=600)
    assert out.returncode == 0 and b"Traceback" not in out.stderr, out.stderr[-2000:]
    assert "→" in (tmp_path / "export" / "student" / "README.md").read_text(encoding="utf-8")


def test_version_names_the_package_and_the_libraries_it_runs_on(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith(f"cidistill {version('cidistill')} (torch {version('torch')}, ")
    assert f"ray {version('ray')}" in out and "faiss" in out and "not installed" not in out


def test_an_in_memory_work_folder_under_ray_is_one_line(tmp_path, capsys):
    """`workdir: memory://…` (fsspec's in-memory filesystem): every Ray task failed on files it could not see,
    with Ray's retries and tracebacks on the console. With --no-ray (one process) it is allowed."""
    from cidistill.app.registry import run_stages
    from cidistill.core.config import load_config

    assert main(["download", "--workdir", f"memory://{tmp_path.name}/w"]) == 2
    assert "memory://" in (err := _err(capsys)) and "use a local folder or object storage" in err
    assert main(["compare", "--workdir", f"memory://{tmp_path.name}/w"]) == 2  # compare starts Ray itself
    assert "workdir: memory://" in _err(capsys)
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"dirs.card=memory://{tmp_path.name}/card"])
    with pytest.raises(ConfigError, match="dirs.card: memory://"):
        run_stages(cfg, ["card"])


def test_verbose_is_for_that_command_only(monkeypatch, capsys):
    """`-v` (every library's log lines) stayed set in the process for every later `main()` of a library caller."""
    import os

    monkeypatch.delenv("CIDISTILL_VERBOSE", raising=False)
    assert main(["-v", "config"]) == 0 and "CIDISTILL_VERBOSE" not in os.environ
    monkeypatch.setenv("CIDISTILL_VERBOSE", "1")
    assert main(["config"]) == 0 and os.environ["CIDISTILL_VERBOSE"] == "1"


def test_a_console_whose_reader_went_away_stops_the_output_not_the_run(tmp_path, small_run):
    """`cidistill run … | head -1`, a `tee` that died, a terminal gone: the next progress line raised
    BrokenPipeError and the run stopped with `error: stage 'download': [Errno 32] Broken pipe` (rc 2). Now the
    console goes quiet after one line on stderr, and the run finishes (Ray's forwarded lines included)."""
    import os
    import sys

    d = to_dict(small_run)
    out = tmp_path / "eval"
    d["workdir"] = str(tmp_path / "work")
    d["dirs"] = {**{s: small_run.stage_dir(s) for s in ("download", "embed", "balance", "cluster", "pack", "train")},
                 "eval": str(out)}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first line
    proc = subprocess.run([sys.executable, "-m", "cidistill", "eval", "-c", str(p)], stdout=write,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()}, timeout=600)
    os.close(write)
    err = [ln for ln in proc.stderr.splitlines() if ln.strip() and not RAY_FORWARDED.match(ln)]
    assert proc.returncode == 0 and (out / "_DONE").exists(), proc.stderr
    assert err == ["cidistill: the console reader went away (Broken pipe); the run goes on without console output"], err


def test_the_command_ends_when_an_exit_handler_hangs(tmp_path):
    """A run stopped by SIGTERM under Ray printed its line, had released its lock, and then hung in Ray's shutdown
    at exit for minutes (once, in a full suite run). What runs after main() returns gets EXIT_GRACE_S, then the
    process ends with main()'s exit code and its output flushed. Here an exit handler that sleeps an hour."""
    import os
    import sys
    import time

    from cidistill.app.cli import EXIT_GRACE_S

    assert EXIT_GRACE_S >= 10  # Ray's own shutdown fits in it
    (tmp_path / "sitecustomize.py").write_text("import atexit, time\natexit.register(time.sleep, 3600)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.getcwd()}"}
    grace = 3.0  # the command as installed, with a shorter grace (the suite waits for it)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-c", f"import cidistill.app.cli as c; c.EXIT_GRACE_S = {grace}; c.cli()",
                           "config", "--check", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and grace - 0.5 < time.time() - t0 < grace + 60, proc.stderr
    assert proc.stderr.strip().endswith("none.yaml: cannot read the config file (No such file or directory)")


def test_a_demo_cache_moved_elsewhere_still_builds_the_demo_data(tmp_path, monkeypatch):
    """The demo's image folders are links into the cache's unpacked packages: after the cache folder moved
    (CIDISTILL_CACHE pointed at a copy), the old links dangled and making them again failed with FileExistsError."""
    import os

    from cidistill.app.demo_data import build_demo_data
    from cidistill.app.demo_packages import PACKAGES, fetch_all

    packages = next(iter(fetch_all().values())).parent  # the node's cache, filled as the demo fills it
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "packages").symlink_to(packages)
    images = tmp_path / "demo" / "images"
    images.mkdir()
    (images / "apple").symlink_to(tmp_path / "old-cache" / "apple" / "64")  # where the cache used to be
    monkeypatch.setenv("CIDISTILL_CACHE", str(tmp_path))
    data = build_demo_data.__wrapped__(small=True)
    apple = f"emoji-datasource-apple-{PACKAGES['emoji-datasource-apple']}"
    assert data.root == images
    assert os.readlink(images / "apple") == str(tmp_path / "demo" / "packages" / apple / "package" / "img" / "apple" / "64")
    assert all((images / p).is_file() for p in data.table.column("path").to_pylist()) and data.table.num_rows == 300


def test_the_demo_never_replaces_a_users_run_in_its_folder(tmp_path, small_data, server, capsys):
    """A user's config without `workdir` runs in runs/demo, the demo's own folder; `cidistill demo` there (the
    README's first command run again) redid it as a changed config: the user's download and all after it gone."""
    t = small_data.table.slice(0, 3)
    mine = tmp_path / "mine.parquet"
    pq.write_table(pa.table({"url": [f"{server.base_url}/{p}" for p in t.column("path").to_pylist()],
                             "caption": t.column("caption")}), mine)
    work = tmp_path / "runs" / "demo"
    assert main(["download", "--workdir", str(work), "--set", f"data.urls={mine}", "data.extra_cols=[]",
                 "data.allow_private_addresses=true", "--no-ray"]) == 0
    before = {f.name: f.read_bytes() for f in (work / "download").iterdir()}
    capsys.readouterr()
    assert main(["demo", "--small", "--workdir", str(work), "--no-ray"]) == 2
    assert _err(capsys) == (f"cidistill: error: {work} holds a run on another URL list ({mine}): the demo would "
                            "replace it; give the demo a folder of its own (--workdir) or remove that run")
    assert {f.name: f.read_bytes() for f in (work / "download").iterdir()} == before
    assert not (work / "urls.parquet").exists()
