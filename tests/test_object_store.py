"""The work folder on object storage: a real S3 API (moto's server) on 127.0.0.1, s3fs as the client.

A wrong secret fails the first stage in seconds, in one line; the lock and the store's writes on S3. The small
demo end to end on S3 (every stage, nothing on local disk, the local run's decisions) is the two-node test's."""
import json
import os
import time

import fsspec
import pytest

from cidistill.app.cli import main
from cidistill.core.store import Store
from conftest import cli_stderr, free_port, start_moto


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
