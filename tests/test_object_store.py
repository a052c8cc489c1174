"""The work folder on object storage: a real S3 API (moto's server) on 127.0.0.1, s3fs as the client.

The small demo runs end to end with `--workdir s3://…` and gives the local run's decisions and numbers,
writing nothing of the run to local disk; a wrong secret fails the first stage in seconds, in one line."""
import json
import os
import tempfile
import time

import fsspec
import pytest

from cidistill.app.cli import main
from cidistill.core.config import STAGES
from cidistill.core.store import Store
from conftest import cli_stderr, free_port, start_moto


def _by_key(store: Store, cols: list[str]) -> dict:
    return {r["key"]: r for n in store.glob("0*.parquet") for r in store.read_table(n, columns=cols).to_pylist()}


def _scores(results: dict) -> dict:
    """What the evaluation measured, without timings."""
    s = results["student"]
    return {k: v for k, v in s.items() if k.startswith(("zeroshot_", "probe_", "retrieval_")) and "seconds" not in k}


@pytest.mark.timeout(900)
def test_small_demo_on_s3_equals_the_local_run(s3, small_run, tmp_path, monkeypatch):
    fs = fsspec.filesystem("s3")
    fs.mkdir("demo-bucket")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    tmp_before = set(os.listdir(tempfile.gettempdir()))

    assert main(["demo", "--small", "--workdir", "s3://demo-bucket/run"]) == 0

    for stage in STAGES:
        assert fs.exists(f"demo-bucket/run/{stage}/_DONE"), stage
    for obj in ("export/student/open_clip_config.json", "export/student/open_clip_model.safetensors",
                "card/card.html", "train/model.safetensors", "train/student_arch", "eval/results.json"):
        assert fs.exists(f"demo-bucket/run/{obj}"), obj
    assert "data:image/png;base64," in fs.cat("demo-bucket/run/card/card.html").decode()  # self-contained
    # nothing of the run on local disk: not in the working directory, not left in the temp folder
    assert list(cwd.iterdir()) == []
    left = {n for n in set(os.listdir(tempfile.gettempdir())) - tmp_before if not n.startswith("ray")}
    # wandb (which img2dataset imports) makes two empty temp folders at import, removed at exit: nothing else
    for n in left:
        assert "wandb" in n and not os.listdir(os.path.join(tempfile.gettempdir(), n)), n
    assert not any(fs.glob("demo-bucket/run/**/*.tmp-*")) and not fs.exists("demo-bucket/run/_LOCK.json")

    remote = {s: Store(f"s3://demo-bucket/run/{s}") for s in ("balance", "cluster", "eval")}
    local = {s: Store(small_run.stage_dir(s)) for s in ("balance", "cluster", "eval")}
    cols = ["key", "kept", "drop_reason", "dup_of", "balance_cluster"]
    assert _by_key(remote["balance"], cols) == _by_key(local["balance"], cols)
    cols = ["key", "cluster_id"]
    assert _by_key(remote["cluster"], cols) == _by_key(local["cluster"], cols)
    got, want = _scores(remote["eval"].read_json("results.json")), _scores(local["eval"].read_json("results.json"))
    assert got == want and "zeroshot_en_top1" in got


def test_wrong_secret_fails_in_seconds_in_one_line(tmp_path, monkeypatch, capsys):
    """An S3 server that checks signatures (moto with IAM auth on): a real key id with a wrong secret."""
    import boto3

    port = free_port()
    proc = start_moto(port, {"INITIAL_NO_AUTH_ACTION_COUNT": "3"})  # start check, user, key: unauthenticated
    try:
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x",
                           aws_secret_access_key="x")
        iam.create_user(UserName="pipeline")
        key = iam.create_access_key(UserName="pipeline")["AccessKey"]
        secret = "not-the-secret-0123456789"
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(json.dumps({"storage_options": {"s3": {"endpoint_url": endpoint, "key": key["AccessKeyId"],
                                                              "secret": secret}},
                                   "data": {"urls": "s3://private-bucket/urls.parquet"}}))
        monkeypatch.setitem(fsspec.config.conf, "s3", dict(fsspec.config.conf.get("s3", {})))  # restored after
        t0 = time.time()
        rc = main(["download", "-c", str(cfg), "--workdir", "s3://private-bucket/run"])
        seconds = time.time() - t0
    finally:
        proc.terminate()
        proc.wait(10)
    err = cli_stderr(capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and seconds < 20, (rc, seconds, err)
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "'private-bucket'" in lines[0] and "signature" in lines[0].lower(), lines[0]
    assert secret not in err and key["SecretAccessKey"] not in err


def test_work_folder_lock_on_s3_refuses_a_second_run(s3):
    """The lock object is created with a conditional PUT: a second process is refused, naming the holder."""
    import subprocess
    import sys

    from cidistill.core.lock import work_lock

    fsspec.filesystem("s3").mkdir("lock-bucket")
    second = ("import sys\nfrom cidistill.core.lock import work_lock\nfrom cidistill.core.errors import StageError\n"
              "try:\n    with work_lock('s3://lock-bucket/run'):\n        sys.exit(0)\n"
              "except StageError as e:\n    print(e)\n    sys.exit(7)\n")
    with work_lock("s3://lock-bucket/run"):
        r = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, timeout=120)
    assert r.returncode == 7 and f"pid {os.getpid()}" in r.stdout, (r.stdout, r.stderr)
    r = subprocess.run([sys.executable, "-c", second], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr  # released when the first run ended


def test_store_publishes_whole_objects_or_nothing(s3):
    """The store's writes on S3: a streamed file that fails midway leaves no object; a folder is published
    with its marker file last; local copies are refreshed when an object changes."""
    fsspec.filesystem("s3").mkdir("atomic-bucket")
    store = Store("s3://atomic-bucket/run")
    with pytest.raises(RuntimeError):
        with store.open_atomic("manifest.parquet") as f:
            f.write(b"x" * 1000)
            raise RuntimeError("killed mid-write")
    assert not store.exists("manifest.parquet")
    with store.open_atomic("manifest.parquet") as f:
        f.write(b"whole")
    assert store.read_bytes("manifest.parquet") == b"whole"
    store.write_bytes("model/weights.bin", b"1")
    first = store.local_copy("model")
    assert (first / "weights.bin").read_bytes() == b"1" and store.local_copy("model") == first
    store.write_bytes("model/weights.bin", b"22")
    assert (store.local_copy("model") / "weights.bin").read_bytes() == b"22"  # a changed object is fetched again
