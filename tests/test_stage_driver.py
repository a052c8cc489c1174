"""The stage driver: config- and input-aware resume. A finished stage is skipped only while the config fields
it reads and its inputs' fingerprints are unchanged; a change redoes it and everything downstream, in one line."""
import dataclasses
import json
import re
import shutil

import pytest


from cidistill.core.config import STAGES, load_config
from cidistill.core.stage import DONE, RUN, Stage, plan
from cidistill.core.store import Store, join
from conftest import cli_stderr


def test_join_keeps_the_scheme():
    assert join("s3://bucket/run", "balance") == "s3://bucket/run/balance"
    assert join("s3://bucket/run/", "/x/", "y") == "s3://bucket/run/x/y"
    cfg = load_config(None, ["workdir=gs://b/runs/one"])
    assert cfg.stage_dir("cluster") == "gs://b/runs/one/cluster"



def test_folder_and_file_names_that_look_like_patterns_are_taken_as_they_are(tmp_path):
    """`exp[1]`, `what?`, `a*b` are ordinary folder and file names: fsspec's glob read them as patterns, so a
    work folder named `exp[1]` listed no shard of its own and `urls[2024].csv` was not found."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.url_list import url_files

    for name in ("exp[1]", "what?", "a*b {c}", "x[!y]"):
        store = Store(str(tmp_path / name / "embed"))
        for shard in ("00000.parquet", "00001.parquet", "notes.txt"):
            store.write_bytes(shard, b"x")
        store.write_bytes("part/00002.tmp-1", b"x")
        assert store.glob("[0-9]*.parquet") == ["00000.parquet", "00001.parquet"], name
        assert store.glob("**/*.tmp-*") == ["part/00002.tmp-1"], name
    lists = tmp_path / "lists [2024]"
    lists.mkdir()
    table = pa.table({"url": ["http://127.0.0.1/a.png"], "caption": ["a"]})
    for f in ("urls[2024].parquet", "urls2.parquet", "other.txt"):
        pq.write_table(table, lists / f)
    assert url_files(str(lists / "urls[2024].parquet"))[1] == [str(lists / "urls[2024].parquet")]
    assert url_files(str(lists))[1] == [str(lists / "urls2.parquet"), str(lists / "urls[2024].parquet")]
    assert url_files(str(tmp_path / "lists [[]2024]" / "urls?.parquet"))[1] == [str(lists / "urls2.parquet")]


CALLS: list[str] = []


class _Count(Stage):
    """A toy two-stage chain on memory://: `units` writes its unit stats, counting calls."""
    name = "download"
    reads = ("data.samples_per_shard", "data.thread_count")

    def units(self):
        return ["00000", "00001"]

    def run_unit(self, unit):
        CALLS.append(self.name)
        return {"rows": 1}


class _After(_Count):
    name = "embed"
    inputs = ("download",)
    reads = ("teacher.batch_size",)


def test_fingerprint_skips_resumes_and_redoes(tmp_path, capsys):
    cfg = load_config(None, [f"workdir=memory://{tmp_path.name}/w"])
    assert _Count(cfg).run()["rows"] == 2 and CALLS == ["download"] * 2
    assert _Count(cfg).run()["rows"] == 2 and len(CALLS) == 2                # skipped
    assert "already done" in capsys.readouterr().out
    cfg.data.thread_count = 3                                                 # operational: still skipped
    _Count(cfg).run()
    assert len(CALLS) == 2
    _After(cfg).run()
    cfg.data.samples_per_shard = 7                                            # read by download: redone, and
    stages = [_Count(cfg), _After(cfg)]                                       # embed after it
    assert plan(stages) == ["download: config changed (data.samples_per_shard 1000 → 7); redoing download, embed"]
    CALLS.clear()
    stages[0].run()
    assert CALLS == ["download"] * 2
    st = _After(cfg)
    assert st.status(st.fingerprint()) == ("changed", "input changed (download)")
    # a half-finished run of another config is cleared, never resumed
    st.run()
    st.out.rm(DONE)
    st.out.rm("00001_stats.json")
    old_batch = cfg.teacher.batch_size
    cfg.teacher.batch_size = 8
    st = _After(cfg)
    assert st.status(st.fingerprint()) == ("changed", f"config changed (teacher.batch_size {old_batch} → 8)")
    CALLS.clear()
    assert st.run()["shards_resumed"] == 0 and CALLS == ["embed"] * 2
    st.out.rm(DONE)
    st.out.rm("00001_stats.json")                                             # same config: resumed
    assert _After(cfg).run()["shards_resumed"] == 1 and CALLS == ["embed"] * 3
    assert Store(cfg.stage_dir("embed")).read_json(RUN)["fingerprint"] == Store(cfg.stage_dir("embed")).read_json(DONE)["fingerprint"]


def test_a_stage_writes_and_clears_only_an_empty_folder_or_its_own(tmp_path):
    """`--force` on a stage given a folder of the user's files (or another stage's folder) deleted what was
    there; it now refuses before touching anything."""
    from cidistill.core.errors import StageError

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"dirs.download={mine}"])
    with pytest.raises(StageError, match=r"mine is not empty and holds no download outputs \(e.g. 'notes.txt'\)"):
        _Count(cfg).run(force=True)
    assert (mine / "notes.txt").read_text() == "keep" and sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    shared = load_config(None, [f"workdir={tmp_path / 'w2'}", f"dirs.embed={tmp_path / 'w2' / 'download'}"])
    _Count(shared).run()
    with pytest.raises(StageError, match=r"holds the download stage's outputs: give embed a folder of its own"):
        _After(shared).run(force=True)
    assert _Count(shared).run()["rows"] == 2  # still there, still done
    (tmp_path / "w3" / "download" / "_scratch").mkdir(parents=True)  # an empty folder (a stage's scratch) is fine
    assert _Count(load_config(None, [f"workdir={tmp_path / 'w3'}"])).run()["rows"] == 2


def test_changed_apply_eps_redoes_balance_and_downstream_only(small_run, tmp_path, capsys):
    """The issue's check on the small demo: another ε redoes balance → card (the removed count follows it),
    download and embed are skipped; an unchanged rerun skips everything."""
    from cidistill.app.registry import run_stages

    work = tmp_path / "w"
    shutil.copytree(small_run.workdir, work, ignore=shutil.ignore_patterns("_ray"))
    cfg = dataclasses.replace(small_run, workdir=str(work), balance=dataclasses.replace(small_run.balance))
    before = json.loads((work / "balance" / "stats.json").read_text())
    cfg.balance.apply_eps = 0.01
    capsys.readouterr()
    run_stages(cfg, list(STAGES), use_ray=False)  # what is redone is the driver's choice, in or out of Ray
    out = capsys.readouterr().out
    assert (f"balance: config changed (balance.apply_eps {small_run.balance.apply_eps} → 0.01); "
            "redoing balance, cluster, pack, train, eval, export, card") in out
    assert "[download] already done" in out and "[embed] already done" in out and out.count("already done") == 2
    # the closing line names the stages that did work (it listed download and embed as finished too)
    assert "[cidistill] 7 stage(s) balance, cluster, pack, train, eval, export, card finished in " in out
    assert out.rstrip().endswith("; 2 were done")
    after = json.loads((work / "balance" / "stats.json").read_text())
    assert after["apply_eps"] == 0.01 and after["removed"] != before["removed"]
    assert json.loads((work / "card" / "stats.json").read_text())["funnel"]["kept"] == after["kept"]
    run_stages(cfg, list(STAGES), use_ray=False)
    out = capsys.readouterr().out
    assert out.count("already done") == len(STAGES)
    assert f"[cidistill] nothing to redo: the {len(STAGES)} stage(s) were done (" in out


def test_one_stage_run_refuses_inputs_the_config_would_make_differently(small_run, tmp_path):
    """`cidistill pack` after balance.apply_eps changed would pack the old balance's choices: it refuses in
    one line naming the stage, the change and the run that redoes it; with the stages included it runs."""
    from cidistill.app.registry import run_stages
    from cidistill.core.errors import StageError

    work = tmp_path / "w"
    shutil.copytree(small_run.workdir, work, ignore=shutil.ignore_patterns("_ray"))
    cfg = dataclasses.replace(small_run, workdir=str(work), balance=dataclasses.replace(small_run.balance))
    old, cfg.balance.apply_eps = cfg.balance.apply_eps, 0.01
    with pytest.raises(StageError, match=re.escape(
            f"pack reads balance, which is out of date: config changed (balance.apply_eps {old} → 0.01); "
            "run `cidistill run CONFIG --stages balance cluster pack`")):
        run_stages(cfg, ["pack"], use_ray=False)
    assert run_stages(cfg, ["balance", "cluster", "pack"], use_ray=False)["balance"]["apply_eps"] == 0.01


def test_second_run_on_a_work_folder_refuses_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    """A run holds the folder (a live process named in _LOCK.json): another refuses at once with one line
    naming host, pid and start; once that process is gone, the next run takes the lock over, as it does a lock
    left empty."""
    import socket
    import subprocess
    import sys
    import time

    from cidistill.app.cli import main

    work = tmp_path / "w"
    work.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (work / "_LOCK.json").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid,
                                                     "started": "2026-12-01 10:00:00"}))
        t0 = time.time()
        assert main(["balance", "--workdir", str(work), "--no-ray"]) == 2
        err = cli_stderr(capsys)
        assert time.time() - t0 < 30 and len(err.splitlines()) == 1
        assert f"pid {holder.pid}" in err and socket.gethostname() in err and "2026-12-01 10:00:00" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(["balance", "--workdir", str(work), "--no-ray"]) == 2     # now fails for its own reason
    out, err = capsys.readouterr()
    assert "taking over the lock" in out and "needs a finished embed stage" in err
    assert not (work / "_LOCK.json").exists()                              # released after the run
    # a lock left empty (a run killed between creating and writing it) was a JSONDecodeError on every later run
    (work / "_LOCK.json").write_text("")
    assert main(["balance", "--workdir", str(work), "--no-ray"]) == 2
    out, err = capsys.readouterr()
    assert "taking over a damaged lock (empty or cut short" in out and "needs a finished embed stage" in err
    assert sorted(p.name for p in work.iterdir() if p.name.startswith("_LOCK")) == []  # no temp file left either
