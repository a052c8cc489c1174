"""Download stage: real img2dataset over loopback HTTP, on Ray; failures counted by reason; resume."""
import io
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cidistill.core.config import load_config
from cidistill.app.demo_data import LoopbackServer
from cidistill.core.packed import iter_tar_samples
from cidistill.core.stage import RUN
from cidistill.core.store import Store
from pipeline.download import DownloadStage

LOOPBACK = "data.allow_private_addresses=true"  # the tests' servers listen on 127.0.0.1


@pytest.fixture()
def bad_site(tmp_path, small_data):
    site = tmp_path / "site"
    site.mkdir()
    good = next((small_data.root / "apple").glob("*.png")).read_bytes()
    (site / "page.png").write_bytes(b"<html><body>not an image</body></html>")
    (site / "trunc.png").write_bytes(good[: len(good) // 3])
    (site / "empty.png").write_bytes(b"")
    with LoopbackServer(site) as srv:
        yield srv


def _urls(tmp_path, small_data, server, bad_site, n=60):
    t = small_data.table.slice(0, n)
    rows = [{"url": f"{server.base_url}/{p}", "caption": c, "caption_zh": z}
            for p, c, z in zip(t.column("path").to_pylist(), t.column("caption").to_pylist(), t.column("caption_zh").to_pylist())]
    rows += [{"url": f"{server.base_url}/missing/404.png", "caption": "gone", "caption_zh": ""},
             {"url": f"{bad_site.base_url}/page.png", "caption": "html", "caption_zh": ""},
             {"url": f"{bad_site.base_url}/trunc.png", "caption": "truncated", "caption_zh": ""},
             {"url": f"{bad_site.base_url}/empty.png", "caption": "empty body", "caption_zh": ""},
             {"url": "http://127.0.0.1:9/dead-host.png", "caption": "dead host", "caption_zh": ""},
             {"url": "file:///etc/passwd", "caption": "local file", "caption_zh": ""},
             {"url": rows[0]["url"], "caption": "duplicate url", "caption_zh": ""},
             {"url": "", "caption": "no url", "caption_zh": ""}]
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, n


def test_download_counts_failures_and_resumes(tmp_path, ray_session, small_data, server, bad_site):
    urls, n_good = _urls(tmp_path, small_data, server, bad_site)
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"data.urls={urls}", "data.samples_per_shard=20",
                             "data.extra_cols=[caption_zh]", "data.timeout=3", LOOPBACK])
    stats = DownloadStage(cfg).run()
    assert stats["successes"] == n_good
    assert stats["failed_to_download"] + stats["failed_to_resize"] == 5        # 404, html, truncated, empty, dead host
    assert stats["urls_rejected"] == {"scheme_not_allowed": 1, "duplicate_url": 1, "empty_url": 1}
    # the dead host (connection refused) is transient: that URL alone was fetched data.transient_attempts times
    assert stats["failed_transient"] == 1 and stats["failed_permanent"] == 4 and stats["shards_retried"] == 1
    assert stats["samples_lost"] == 0 and stats["count"] == n_good + 5
    reasons = " ".join(stats["status_dict"])
    assert "404" in reasons
    out = Path(cfg.stage_dir("download"))
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert len(shards) == 4 and not list(out.glob("*.tmp-*")) and not (out / "_tmp").exists()
    keys = [k for s in sorted(out.glob("0*.parquet")) for k in pq.read_table(s).column("key").to_pylist()]
    assert len(keys) == len(set(keys)) == n_good + 5

    # a rerun of a finished stage does nothing
    assert DownloadStage(cfg).run()["successes"] == n_good

    # a run killed after some shards: no done-marker, one shard's verdict, stats and tar gone (half-written)
    os.remove(out / "_DONE")
    os.remove(out / "00001_verdict.json")
    os.remove(out / "00001_stats.json")
    with open(out / "00001.tar", "r+b") as f:
        f.truncate(100)
    before = {p.name: p.read_bytes() for p in out.glob("0000[023].parquet")}
    again = DownloadStage(cfg).run()
    assert again["shards_resumed"] == 3 and again["successes"] == n_good and again["count"] == stats["count"]
    assert {p.name: p.read_bytes() for p in out.glob("0000[023].parquet")} == before
    keys2 = [k for s in sorted(out.glob("0*.parquet")) for k in pq.read_table(s).column("key").to_pylist()]
    assert sorted(keys2) == sorted(keys)


def test_worker_death_is_retried_and_a_failing_shard_is_reported(tmp_path, ray_session, small_data, server,
                                                                  bad_site, monkeypatch):
    from cidistill.core import faults
    from cidistill.core.errors import StageError

    urls, n_good = _urls(tmp_path, small_data, server, bad_site)
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"data.urls={urls}", "data.samples_per_shard=20",
                             "data.extra_cols=[caption_zh]", "data.timeout=3", "data.shard_retries=1", LOOPBACK])
    # the first Ray worker to finish a shard is SIGKILLed before it returns: Ray retries that shard
    mark = tmp_path / "killed-once"
    monkeypatch.setenv("CIDISTILL_KILL_AT", "download@worker:1")
    monkeypatch.setenv("CIDISTILL_KILL_ONCE", str(mark))
    faults.set_stage("download")
    try:
        stats = DownloadStage(cfg).run()
    finally:
        faults.set_stage("none")
    assert mark.exists() and stats["successes"] == n_good and stats["samples_lost"] == 0

    # a shard whose input is broken fails on every retry: reported with its error, the others finish
    monkeypatch.delenv("CIDISTILL_KILL_AT")
    cfg2 = load_config(None, [f"workdir={tmp_path / 'w2'}", f"data.urls={urls}", "data.samples_per_shard=20",
                              "data.extra_cols=[caption_zh]", "data.timeout=3", "data.shard_retries=1", LOOPBACK])
    stage = DownloadStage(cfg2)
    stage.out.write_json(RUN, {"stage": "download", **stage.fingerprint()})  # as run() starts: then the plan
    stage.units()
    (Path(cfg2.stage_dir("download")) / "_tmp" / "2.feather").write_bytes(b"not arrow")
    with pytest.raises(StageError, match="00002"):
        stage.run()
    out = Path(cfg2.stage_dir("download"))
    st = json.loads((out / "stats.json").read_text())
    assert list(st["failed_shards"]) == ["00002"] and st["shards_done"] == 3 and not (out / "_DONE").exists()


def test_the_chinese_caption_comes_from_data_caption_zh_col_without_listing_it(tmp_path, small_data, server):
    """A URL list whose Chinese captions sit in another column: `data.caption_zh_col` names it, nothing in
    extra_cols, and the shards carry it as `caption_zh` (what embed and pack read). A list without the default
    column simply has no Chinese captions; a configured column that is missing is a one-line error."""
    t = small_data.table.slice(0, 12)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"link": [f"{server.base_url}/{p}" for p in t.column("path").to_pylist()],
                             "text": t.column("caption"), "text_zh": t.column("caption_zh")}), urls)
    common = [f"data.urls={urls}", "data.url_col=link", "data.caption_col=text", "data.timeout=3", LOOPBACK]
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", "data.caption_zh_col=text_zh", *common])
    assert DownloadStage(cfg, use_ray=False).run()["successes"] == 12
    got = pq.read_table(Path(cfg.stage_dir("download")) / "00000.parquet").sort_by("key")
    assert got.column("caption_zh").to_pylist() == t.column("caption_zh").to_pylist()
    assert got.column("caption").to_pylist() == t.column("caption").to_pylist()

    plain = load_config(None, [f"workdir={tmp_path / 'w2'}", *common])      # default caption_zh: absent, fine
    assert DownloadStage(plain, use_ray=False).run()["successes"] == 12
    assert "caption_zh" not in pq.read_table(Path(plain.stage_dir("download")) / "00000.parquet").column_names
    from cidistill.core.errors import StageError
    with pytest.raises(StageError, match=r"missing column\(s\) \['chinese'\]"):
        DownloadStage(load_config(None, [f"workdir={tmp_path / 'w3'}", "data.caption_zh_col=chinese", *common]),
                      use_ray=False).run()


def test_a_url_list_in_csv_tsv_or_json_lines_downloads_as_its_parquet_twin(tmp_path, small_data, server):
    """img2dataset's users keep URL lists as csv, tsv or JSON lines (CC3M and CC12M ship as tsv): each, with a
    header row, gzipped or not, gives the same shards as the same rows in parquet; captions that hold commas,
    quotes, tabs, newlines or Chinese arrive whole. Non-UTF-8 bytes in a caption are replaced and counted, as in
    parquet; a broken row or a missing column is one line naming the file."""
    import csv
    import gzip

    from cidistill.core.errors import StageError

    t = small_data.table.slice(0, 14)
    odd = ['a "quoted", comma', "tab\there", "two\nlines", "  spaces  ", "", "emoji 🍎 and 中文"]
    rows = [{"url": f"{server.base_url}/{p}", "caption": (odd[i] if i < len(odd) else c), "caption_zh": z, "group": str(i % 3)}
            for i, (p, c, z) in enumerate(zip(t.column("path").to_pylist(), t.column("caption").to_pylist(),
                                               t.column("caption_zh").to_pylist()))]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    for name, delim in (("urls.csv", ","), ("urls.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    (tmp_path / "urls.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "urls.csv.gz").write_bytes(gzip.compress((tmp_path / "urls.csv").read_bytes()))

    def download(name: str, *extra: str) -> pa.Table:
        cfg = load_config(None, [f"workdir={tmp_path / ('w-' + name)}", f"data.urls={tmp_path / name}",
                                 "data.extra_cols=[group]", "data.timeout=3", "data.samples_per_shard=8", LOOPBACK, *extra])
        assert DownloadStage(cfg, use_ray=False).run()["successes"] == len(rows)
        got = pa.concat_tables(pq.read_table(p) for p in sorted(Path(cfg.stage_dir("download")).glob("0*.parquet")))
        return got.select(["key", "url", "caption", "caption_zh", "group", "status", "sha256"]).sort_by("key")

    twin = download("urls.parquet")
    assert twin.column("caption").to_pylist()[:len(odd)] == odd
    for name in ("urls.csv", "urls.tsv", "urls.jsonl", "urls.csv.gz"):
        assert download(name).equals(twin), name

    (tmp_path / "latin1.csv").write_bytes(b"url,caption\n" + f"{rows[0]['url']},caf".encode() + b"\xe9\n")
    cfg = load_config(None, [f"workdir={tmp_path / 'w-latin1'}", f"data.urls={tmp_path / 'latin1.csv'}", LOOPBACK])
    stats = DownloadStage(cfg, use_ray=False).run()
    assert stats["text_fixed"] == {"caption_not_utf8": 1}
    assert pq.read_table(Path(cfg.stage_dir("download")) / "00000.parquet").column("caption").to_pylist() == ["caf\ufffd"]

    (tmp_path / "broken.csv").write_text(f"url,caption\n{rows[0]['url']},one,too many\n")
    with pytest.raises(StageError, match=r"^data.urls: .*broken.csv is not readable as csv with a header row \(CSV parse error"):
        DownloadStage(load_config(None, [f"workdir={tmp_path / 'w-broken'}", f"data.urls={tmp_path / 'broken.csv'}"]),
                      use_ray=False).run()
    (tmp_path / "nocap.tsv").write_text(f"url\ttext\n{rows[0]['url']}\thi\n")
    with pytest.raises(StageError, match=r"nocap.tsv: missing column\(s\) \['caption'\]; has \['url', 'text'\] \(a csv or "
                                         r"tsv list needs a header row naming its columns\)$"):
        DownloadStage(load_config(None, [f"workdir={tmp_path / 'w-nocap'}", f"data.urls={tmp_path / 'nocap.tsv'}"]),
                      use_ray=False).run()


def test_a_uri_s_password_signature_or_token_is_never_shown_or_written(tmp_path, small_data, server, capsys):
    """A URL list served over http with a password and a presigned signature in its URL (a checkpoint with a
    token): they were printed by `cidistill config` and in errors, and written into every stage's _RUN.json and
    _DONE fields and the data card's provenance. Now masked everywhere; the same list with a new token is the
    same input."""
    from cidistill.app.cli import main
    from cidistill.core.config import flat_fields, public_dict

    t = small_data.table.slice(0, 6)
    site = tmp_path / "site"
    site.mkdir()
    pq.write_table(pa.table({"url": [f"{server.base_url}/{p}" for p in t.column("path").to_pylist()],
                             "caption": t.column("caption")}), site / "urls.parquet")
    secrets = ("hunter2", "abc123def", "tok456")
    with LoopbackServer(site) as lists:
        host = lists.base_url.split("//", 1)[1]
        urls = f"http://alice:hunter2@{host}/urls.parquet?X-Amz-Signature=abc123def&X-Amz-Date=20261204"
        sets = [f"data.urls={urls}", "teacher.pretrained=https://127.0.0.1:9/w.safetensors?token=tok456"]
        assert main(["config", "--set", *sets]) == 0
        shown = capsys.readouterr().out
        assert f"http://alice:***@{host}/urls.parquet?X-Amz-Signature=***&X-Amz-Date=20261204" in shown
        cfg = load_config(None, sets)
        assert not any(s in json.dumps([shown, flat_fields(cfg, ("data", "teacher")), public_dict(cfg)]) for s in secrets)

        w = tmp_path / "w"
        assert main(["download", "--workdir", str(w), "--set", sets[0], "data.timeout=3", LOOPBACK, "--no-ray"]) == 0
        again = f"http://alice:hunter2@{host}/urls.parquet?X-Amz-Signature=zzz999&X-Amz-Date=20261204"
        assert main(["download", "--workdir", str(w), "--set", f"data.urls={again}", "data.timeout=3", LOOPBACK, "--no-ray"]) == 0
        assert "already done" in capsys.readouterr().out
        from data_cards.collect import _url_facts  # the card's provenance line

        assert _url_facts(urls)["path"] == f"http://alice:***@{host}/urls.parquet?X-Amz-Signature=***&X-Amz-Date=20261204"
        written = b"".join(p.read_bytes() for p in w.rglob("*") if p.is_file())
        assert b"alice:***@" in written and not any(s.encode() in written for s in secrets + ("zzz999",))
    gone = f"http://alice:hunter2@{host}/urls.parquet?X-Amz-Signature=abc123def"  # its server stopped
    assert main(["download", "--workdir", str(tmp_path / "w2"), "--set", f"data.urls={gone}", "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cidistill: error: data.urls: cannot read 'http://alice:***@{host}/urls.parquet?X-Amz-Signature=***'")
    assert not any(s in err for s in secrets)


def test_a_download_with_no_success_fails_in_one_line_and_is_not_done(tmp_path):
    """Every URL refused (the server is down): the stage writes its stats but no done-marker, and says so in
    one line (embed then ran on nothing and balance died with an IndexError in each task)."""
    from cidistill.core.errors import StageError

    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:9/{i}.png" for i in range(6)], "caption": ["x"] * 6}), urls)
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"data.urls={urls}", "data.transient_attempts=1",
                             LOOPBACK])
    with pytest.raises(StageError, match=r"download: none of the 6 URLs was downloaded \(6x .*Connection refused"):
        DownloadStage(cfg, use_ray=False).run()
    out = Path(cfg.stage_dir("download"))
    assert json.loads((out / "stats.json").read_text())["failed_transient"] == 6 and not (out / "_DONE").exists()
    # by default a loopback address is never connected to: a permanent failure, named with its setting
    cfg = load_config(None, [f"workdir={tmp_path / 'w2'}", f"data.urls={urls}", "data.transient_attempts=1"])
    with pytest.raises(StageError, match=r"none of the 6 URLs was downloaded \(6x address not public: 127\.0\.0\.1 "
                                         r"\(data\.allow_private_addresses\)\)"):
        DownloadStage(cfg, use_ray=False).run()
    stats = json.loads((Path(cfg.stage_dir("download")) / "stats.json").read_text())
    assert stats["failed_permanent"] == 6 and stats["failed_transient"] == 0
    # the setting is no part of the fingerprint (an upgrade that brought it redoes no finished download);
    # the URLs it refused are fetched again by --force
    allowed = load_config(None, [f"workdir={tmp_path / 'w2'}", f"data.urls={urls}", LOOPBACK, "data.transient_attempts=1"])
    assert DownloadStage(allowed, use_ray=False).fingerprint() == DownloadStage(cfg, use_ray=False).fingerprint()
    with pytest.raises(StageError, match=r"6x .*Connection refused"):
        DownloadStage(allowed, use_ray=False).run(force=True)


def test_carried_columns_of_any_type_arrive_and_a_sample_img2dataset_cannot_write_fails_its_shard(
        tmp_path, ray_session, small_data, server, monkeypatch):
    """A categorical caption column was refused as "not text". A carried timestamp column made img2dataset drop every sample (its per-sample json could not hold a
    datetime): it printed a traceback per sample, counted each as a success, and the stage said "12 ok" over
    shards that held none. Columns json cannot hold now travel as their text (ISO 8601 for times); a sample
    img2dataset still fails to write fails its shard in one line, with no done-marker, and the rerun fills it."""
    import datetime
    import decimal

    from cidistill.core.errors import StageError

    t = small_data.table.slice(0, 12)
    day = datetime.datetime(2024, 2, 29, 13, 5)
    urls = tmp_path / "urls.parquet"
    pq.write_table(pa.table({
        # categorical (dictionary) and large_string text columns, as pandas and polars write them
        "url": pa.array([f"{server.base_url}/{p}" for p in t.column("path").to_pylist()]).dictionary_encode(),
        "caption": t.column("caption").cast(pa.large_string()).dictionary_encode(),
        "taken": pa.array([day + datetime.timedelta(days=i) for i in range(12)], pa.timestamp("us", tz="UTC")),
        "price": pa.array([decimal.Decimal(f"{i}.25") for i in range(12)], pa.decimal128(6, 2)),
        "seen": pa.array([[day.date()]] * 12), "vendor": pa.array(["a", "b"] * 6).dictionary_encode(),
        "size": pa.array([{"w": i, "h": 2 * i} for i in range(12)])}), urls)
    args = [f"data.urls={urls}", "data.extra_cols=[taken,price,seen,vendor,size]", "data.samples_per_shard=6", LOOPBACK]
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", *args])
    stats = DownloadStage(cfg).run()          # on Ray: img2dataset runs in the workers
    assert stats["successes"] == 12 and stats["samples_lost"] == 0 and stats["rows_written"] == 12
    assert stats["carried_as_text"] == {"taken": "timestamp[us, tz=UTC]", "price": "decimal128(6, 2)",
                                        "seen": "list<element: date32[day]>"}
    out = Path(cfg.stage_dir("download"))
    got = pa.concat_tables([pq.read_table(out / f"0000{i}.parquet") for i in range(2)]).sort_by("key")
    assert got.column("taken").to_pylist()[:2] == ["2024-02-29T13:05:00+00:00", "2024-03-01T13:05:00+00:00"]
    assert got.column("price").to_pylist()[3] == "3.25" and got.column("seen").to_pylist()[0] == '["2024-02-29"]'
    assert got.column("vendor").to_pylist()[:2] == ["a", "b"] and got.column("size").to_pylist()[1] == {"w": 1, "h": 2}
    assert got.column("caption").type == pa.string() and sorted(got.column("caption").to_pylist()) == \
        sorted(t.column("caption").to_pylist())

    # img2dataset's writer failing on one sample (in this process: --no-ray), and the rerun once it works
    from img2dataset.writer import WebDatasetSampleWriter

    real_write = WebDatasetSampleWriter.write

    def failing_write(self, img_str, key, caption, meta):
        if meta.get("url", "").endswith(t.column("path")[7].as_py()):
            raise OSError("simulated write error")
        return real_write(self, img_str, key, caption, meta)

    monkeypatch.setattr(WebDatasetSampleWriter, "write", failing_write)
    cfg2 = load_config(None, [f"workdir={tmp_path / 'w2'}", *args, "data.shard_retries=0"])
    with pytest.raises(StageError, match=r"00001: StageError: download shard 00001: img2dataset wrote 5 of its 6 "
                                         r"samples \(1x simulated write error\)"):
        DownloadStage(cfg2, use_ray=False).run()
    out2 = Path(cfg2.stage_dir("download"))
    assert not (out2 / "_DONE").exists() and not (out2 / "00001_verdict.json").exists()
    monkeypatch.setattr(WebDatasetSampleWriter, "write", real_write)
    assert DownloadStage(cfg2, use_ray=False).run()["successes"] == 12


def test_transient_failures_alone_are_fetched_again_and_merged_under_their_keys(tmp_path, small_data):
    """A server that answers 503 to two images the first time: only those two URLs are fetched again (the
    whole shard was, data.transient_attempts times: every good image three times over on a web-scale shard),
    and they join the shard under the keys they had, in its parquet, its tar (image, caption, json) and its
    counts, exactly as if they had come the first time."""
    import functools
    import http.server
    import threading
    from collections import Counter

    from cidistill.core.images import read_tar_images

    hits: Counter = Counter()
    flaky = set()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            hits[self.path] += 1
            if self.path in flaky and hits[self.path] == 1:
                self.send_error(503)
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(small_data.root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        t = small_data.table.slice(0, 10)
        paths = [f"/{p}" for p in t.column("path").to_pylist()]
        flaky.update(paths[3:5])
        urls = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"url": [f"http://127.0.0.1:{httpd.server_address[1]}{p}" for p in paths],
                                 "caption": t.column("caption")}), urls)
        cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"data.urls={urls}", "data.transient_attempts=3", LOOPBACK])
        stats = DownloadStage(cfg, use_ray=False).run()
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert stats["successes"] == 10 and stats["failed_transient"] == 0 and stats["shards_retried"] == 1
    assert stats["status_dict"] == {"success": 10} and stats["samples_lost"] == 0
    assert [hits[p] for p in paths] == [1, 1, 1, 2, 2, 1, 1, 1, 1, 1]      # the others fetched once
    out = Path(cfg.stage_dir("download"))
    got = pq.read_table(out / "00000.parquet")
    by_url = dict(zip([u.split(":", 2)[-1].split("/", 1)[-1] for u in got.column("url").to_pylist()],
                      got.column("key").to_pylist()))
    assert sorted(got.column("key").to_pylist()) == [f"{i:08d}" for i in range(10)]
    assert [by_url[p[1:]] for p in paths] == [f"{i:08d}" for i in range(10)]  # each row keeps its own key
    images = read_tar_images(Store(str(out)), "00000.tar")
    assert sorted(images) == sorted(by_url.values())
    for p in paths[3:5]:
        assert Image.open(io.BytesIO(images[by_url[p[1:]]])).size == (64, 64)
    samples = {s["__key__"]: s for s in iter_tar_samples(Store(str(out)), "00000.tar")}
    for k, s in samples.items():
        assert json.loads(s["json"])["key"] == k and s["txt"].decode() == t.column("caption")[int(k)].as_py()
    assert json.loads((out / "00000_stats.json").read_text())["successes"] == 10
