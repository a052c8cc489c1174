"""Bad inputs: each is a clear error or a counted skip with its reason, never a crash of the whole job."""
import functools
import json
import http.server
import struct
import subprocess
import threading
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from cidistill.core.config import load_config, to_dict
from cidistill.core.errors import StageError
from conftest import cli_stderr


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(w: int, h: int, depth: int, color: int, raw: bytes) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, 0))
            + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b""))


def make_odd_images(site: Path) -> None:
    rng = np.random.default_rng(0)
    rgb = (rng.random((48, 48, 3)) * 255).astype(np.uint8)
    Image.fromarray(rgb).convert("CMYK").save(site / "cmyk.jpg", quality=90)
    Image.fromarray((rng.random((48, 48)) * 65535).astype(np.uint16)).save(site / "gray16.png")
    rows = b"".join(b"\0" + rng.integers(0, 65535, 32 * 3, dtype=np.uint16).astype(">u2").tobytes() for _ in range(32))
    (site / "rgb16.png").write_bytes(_png(32, 32, 16, 2, rows))
    Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE).save(site / "palette.png", transparency=0)
    frames = [Image.fromarray(np.roll(rgb, 5 * i, 0)) for i in range(3)]
    frames[0].save(site / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("L", (1200, 1200), 128).save(site / "big.png")                      # over the configured limit
    (site / "bomb.png").write_bytes(_png(100_000, 100_000, 8, 2, b"\0" * 1000))    # declares 10^10 pixels


class _OptOutHandler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; URLs containing `noai` carry the X-Robots-Tag opt-out."""

    def end_headers(self):
        if "noai" in self.path:
            self.send_header("X-Robots-Tag", "noai")
        super().end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture()
def odd_site(tmp_path):
    site = tmp_path / "odd"
    site.mkdir()
    make_odd_images(site)
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_OptOutHandler, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def test_odd_images_and_captions_are_counted_never_fatal(tmp_path, odd_site, small_run):
    from pipeline.download import DownloadStage
    from pipeline.embed import EmbedStage

    good = ["cmyk.jpg", "gray16.png", "rgb16.png", "palette.png", "animated.gif"]
    rows = [{"url": f"{odd_site}/{n}", "caption": n.encode(), "caption_zh": "图片"} for n in good]
    rows += [{"url": f"{odd_site}/big.png", "caption": b"too many pixels", "caption_zh": None},
             {"url": f"{odd_site}/bomb.png", "caption": b"decompression bomb", "caption_zh": None},
             {"url": f"{odd_site}/palette.png?noai", "caption": b"site opted out", "caption_zh": None},
             {"url": f"{odd_site}/cmyk.jpg?bad", "caption": b"\xff\xfe not utf-8 \xc3", "caption_zh": None},
             {"url": f"{odd_site}/cmyk.jpg?empty", "caption": b"", "caption_zh": None},
             {"url": f"{odd_site}/cmyk.jpg?long", "caption": b"long " * 2000, "caption_zh": None}]
    schema = pa.schema([("url", pa.string()), ("caption", pa.binary()), ("caption_zh", pa.string())])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), tmp_path / "urls.parquet")
    cfg = load_config(None, [f"workdir={tmp_path / 'w'}", f"data.urls={tmp_path / 'urls.parquet'}",
                             "data.extra_cols=[caption_zh]", "data.max_image_pixels=1000000", "data.timeout=3",
                             "data.allow_private_addresses=true",
                             f"teacher.model={small_run.teacher.model}", f"teacher.pretrained={small_run.teacher.pretrained}"])
    st = DownloadStage(cfg, use_ray=False).run()
    assert st["successes"] == 8 and st["samples_lost"] == 0
    reasons = " | ".join(k for k in st["status_dict"] if k != "success")
    assert "image area too large" in reasons and "CV_IO_MAX_IMAGE_PIXELS" in reasons and "X-Robots-Tag" in reasons
    assert st["text_fixed"] == {"caption_not_utf8": 1, "caption_truncated": 1}
    dl = pq.read_table(Path(cfg.stage_dir("download")) / "00000.parquet").to_pylist()
    long = [r["caption"] for r in dl if r["url"].endswith("?long")][0]
    assert len(long) == cfg.data.max_caption_chars

    emb = EmbedStage(cfg, use_ray=False).run()
    assert emb["embedded"] == 8 and emb["empty_caption"] == 1
    t = pq.read_table(Path(cfg.stage_dir("embed")) / "00000.parquet")
    x = np.array(t.column("image_emb").to_pylist(), np.float32)
    assert np.isfinite(x).all() and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-2)
    assert t.column("text_emb_zh").null_count == 3  # only the five good images had Chinese captions


def _small_cfg_file(tmp_path, small_run, **dirs) -> Path:
    d = to_dict(small_run)
    d["dirs"] = {k: str(v) for k, v in dirs.items()}
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(d, allow_unicode=True))
    return p


def test_corrupt_and_schema_mismatched_parquet_are_clear_errors(tmp_path, small_run, capsys):
    import shutil

    from cidistill.app.cli import main

    emb = tmp_path / "embed"
    shutil.copytree(small_run.stage_dir("embed"), emb)
    (emb / "00001.parquet").write_bytes(b"PAR1 this is not parquet")
    cfg = _small_cfg_file(tmp_path, small_run, embed=emb, balance=tmp_path / "balance")
    assert main(["balance", "-c", str(cfg), "--no-ray"]) == 2
    err = capsys.readouterr().err
    assert "00001.parquet" in err and "not a readable parquet file" in err
    assert not (tmp_path / "balance" / "_DONE").exists()

    pq.write_table(pa.table({"key": ["x"], "wrong": [1]}), emb / "00001.parquet")
    assert main(["balance", "-c", str(cfg), "--no-ray"]) == 2
    assert "image_emb" in capsys.readouterr().err


def test_checkpoint_of_the_wrong_shape_is_a_clear_error(tmp_path, small_run):
    from safetensors.torch import save_file

    from cidistill.core.models import ModelLoadError, create

    lm = create(small_run.student.model)
    sd = {k: v.clone() for k, v in lm.model.state_dict().items()}
    first = next(k for k, v in sd.items() if v.ndim == 2)
    sd[first] = sd[first][:, :-1].contiguous()
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ModelLoadError, match=f"{first}: checkpoint"):
        create(small_run.student.model, str(tmp_path / "bad.safetensors"))
    # a trimmed-vocabulary checkpoint of another model (no token embedding this model has): was a KeyError
    import torch

    save_file({"vocab_new2old": torch.arange(5), "other.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(ModelLoadError, match="weights do not fit the model: missing"):
        create(small_run.student.model, str(tmp_path / "other.safetensors"))
    # a pickle that would run code: refused by weights_only loading, and the code never runs
    import torch

    marker = tmp_path / "pwned"
    torch.save({"w": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights.only"):
        create(small_run.student.model, str(tmp_path / "evil.pt"))
    assert not marker.exists()


def test_a_truncated_weights_file_is_one_line(tmp_path, small_run, capsys):
    """A weights file cut short (a copy that stopped): safetensors' own error came as a traceback, from the
    trained student (eval, export) and from a local-dir teacher folder alike."""
    import shutil

    from cidistill.app.cli import main
    from cidistill.core.models import ModelLoadError, create

    teacher = tmp_path / "teacher"
    shutil.copytree(Path(small_run.stage_dir("export")) / "teacher", teacher)
    with open(teacher / "open_clip_model.safetensors", "r+b") as f:
        f.truncate(4096)
    with pytest.raises(ModelLoadError, match="teacher: its weights file is not readable safetensors"):
        create(f"local-dir:{teacher}")
    d = to_dict(small_run)
    d["dirs"] = {s: small_run.stage_dir(s) for s in ("download", "embed", "balance", "cluster", "pack")}
    d["dirs"].update(train=str(tmp_path / "train"), eval=str(tmp_path / "eval"))
    shutil.copytree(small_run.stage_dir("train"), tmp_path / "train", ignore=shutil.ignore_patterns("step-*"))
    with open(tmp_path / "train" / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(d, allow_unicode=True))
    assert main(["eval", "-c", str(tmp_path / "c.yaml"), "--no-ray"]) == 2
    err = cli_stderr(capsys)
    assert "train/model.safetensors: not a readable safetensors file (Error while deserializing header" in err
    assert len(err.splitlines()) == 1, err


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.path}",))


def _tiny_disk(path: Path, size_kb: int) -> bool:
    path.mkdir()
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def test_disk_full_is_a_clear_error_and_no_done_marker(tmp_path, small_run, capsys, monkeypatch):
    """A real 16 kB tmpfs where the box allows mounting; elsewhere every write fails with ENOSPC."""
    import errno

    from cidistill.app.cli import main
    from cidistill.core.store import Store

    out = tmp_path / "full"
    mounted = _tiny_disk(out, 16)
    if not mounted:
        real = Store.write_bytes

        def enospc(self, name, data):
            if str(out) in self.root:
                raise OSError(errno.ENOSPC, "No space left on device", self.path(name))
            return real(self, name, data)

        monkeypatch.setattr(Store, "write_bytes", enospc)
    try:
        cfg = _small_cfg_file(tmp_path, small_run, balance=out)
        assert main(["balance", "-c", str(cfg), "--no-ray"]) == 3
        err = capsys.readouterr().err
        assert "balance" in err and "No space left on device" in err
        assert not (out / "_DONE").exists() and not list(out.glob("*.tmp-*"))
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)
    # the export's folders (copied whole: copytree gathered every file's error into one shutil.Error, a page of
    # text, exit 2, and left its half-copied folder behind)
    out = tmp_path / "export"
    mounted = _tiny_disk(out, 64)
    if not mounted:
        def enospc_copy(src, dst, **kw):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))

        monkeypatch.setattr("cidistill.core.store.shutil.copy2", enospc_copy)
    try:
        assert main(["export", "-c", str(_small_cfg_file(tmp_path, small_run, export=out))]) == 3
        err = cli_stderr(capsys)
        assert err.startswith("cidistill: error: stage 'export' could not write its output: [Errno 28] No space left on "
                              "device") and len(err.splitlines()) == 1, err
        assert not (out / "_DONE").exists() and not list(out.glob(".*.tmp-*")) and not list(out.glob("*.tmp-*"))
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)


def test_a_download_onto_a_full_disk_is_the_exit_3_message_and_resumes_with_room(tmp_path, ray_session, small_data,
                                                                                  server, capsys, monkeypatch):
    """img2dataset's writer on a full disk (a real 600 kB tmpfs, shards of ~460 kB, under Ray): the download went on
    to its summary and died there on a cut-off shard (`ArrowInvalid: Parquet file size is 0 bytes`, a traceback),
    after Ray had retried each shard with a traceback apiece, and its leaked tar files printed "Exception ignored"
    tracebacks at exit. Now: the exit-3 message, no retry, and once there is room the rerun completes."""
    import errno
    import os

    from cidistill.app.cli import main

    t = small_data.table.slice(0, 200)
    rows = [{"url": f"{server.base_url}/{p}", "caption": c} for p, c in zip(t.column("path").to_pylist(), t.column("caption").to_pylist())]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "urls.parquet")
    out = tmp_path / "dl"
    mounted = _tiny_disk(out, 600)
    if not mounted:  # where mounting is not allowed: img2dataset's writer fails as on a full disk, in this process
        from img2dataset.writer import WebDatasetSampleWriter

        real, full = WebDatasetSampleWriter.write, [True]

        def write(self, *a, **kw):
            if full[0] and self.shard_id != 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(self, *a, **kw)

        monkeypatch.setattr(WebDatasetSampleWriter, "write", write)
    args = ["download", "--set", f"workdir={tmp_path / 'w'}", f"dirs.download={out}", f"data.urls={tmp_path / 'urls.parquet'}",
            "data.samples_per_shard=50", "data.allow_private_addresses=true"] + ([] if mounted else ["--no-ray"])
    try:
        assert main(args) == 3
        err = cli_stderr(capsys)
        assert err.startswith("cidistill: error: stage 'download' could not write its output: [Errno 28] No space left on "
                              "device") and err.endswith("rerun to resume.") and len(err.splitlines()) == 1, err
        assert not (out / "_DONE").exists()
        if mounted:
            subprocess.run(["mount", "-o", "remount,size=20m", "tmpfs", str(out)], check=True)
        else:
            full[0] = False
        assert main(args) == 0
        stats = json.loads((out / "stats.json").read_text())
        assert stats["successes"] == 200 and stats["samples_lost"] == 0 and stats["failed_shards"] == {}
    finally:
        if mounted:
            subprocess.run(["umount", str(out)], check=False)


def test_nan_embedding_and_duplicate_keys(tmp_path, small_run):
    """A NaN teacher embedding is dropped as bad_embedding; an embed folder that repeats keys is refused."""
    import shutil

    from pipeline.balance import BalanceStage

    emb = tmp_path / "embed"
    shutil.copytree(small_run.stage_dir("embed"), emb)
    t = pq.read_table(emb / "00000.parquet")
    dl = pq.read_table(Path(small_run.stage_dir("download")) / "00000.parquet", columns=["key", "vendor"]).to_pylist()
    train_key = next(r["key"] for r in dl if r["vendor"] != "twitter")  # the held-out style is never judged
    row = t.column("key").to_pylist().index(train_key)
    x = t.column("image_emb").to_pylist()
    x[row] = [float("nan")] * len(x[row])
    t = t.set_column(t.column_names.index("image_emb"), t.schema.field("image_emb"), pa.array(x, t.schema.field("image_emb").type))
    pq.write_table(t, emb / "00000.parquet")
    cfg = load_config(None, [f"workdir={tmp_path}", f"dirs.embed={emb}", f"dirs.balance={tmp_path / 'b'}",
                             f"dirs.download={small_run.stage_dir('download')}", f"data.holdout={small_run.data.holdout}",
                             "data.extra_cols=[vendor]"])
    st = BalanceStage(cfg, use_ray=False).run()
    assert st["removed_by_rule"]["bad_embedding"] == 1
    b = pq.read_table(tmp_path / "b" / "00000.parquet").to_pylist()
    assert [r["drop_reason"] for r in b if r["key"] == train_key] == ["bad_embedding"]

    shutil.copyfile(emb / "00000.parquet", emb / "00001.parquet")
    with pytest.raises(StageError, match="duplicate keys"):
        BalanceStage(load_config(None, [f"workdir={tmp_path}", f"dirs.embed={emb}", f"dirs.balance={tmp_path / 'b2'}"]),
                     use_ray=False).run()


def test_more_clusters_than_kept_samples_names_the_setting(small_run, tmp_path):
    """cluster.k above the kept count fails before any k-means, naming the key and the largest k that fits."""
    from pipeline.cluster import ClusterStage

    kept = json.loads((Path(small_run.stage_dir("balance")) / "stats.json").read_text())["kept"]
    cfg = load_config(None, [f"workdir={tmp_path}", f"dirs.embed={small_run.stage_dir('embed')}",
                             f"dirs.balance={small_run.stage_dir('balance')}", f"cluster.k={kept + 1}"])
    with pytest.raises(StageError, match=f"cluster.k={kept + 1} is larger than the {kept} samples to cluster .*"
                                         f"at most {kept}"):
        ClusterStage(cfg, use_ray=False).run()


def test_a_holdout_that_matches_no_pair_fails_at_pack_in_one_line(small_run, tmp_path):
    """data.holdout with a value no pair has would leave nothing to evaluate on: the pack stage says so,
    before any training, and the balance stage before it clears its last outputs."""
    from pipeline.pack import PackStage

    dirs = [f"dirs.{s}={small_run.stage_dir(s)}" for s in ("download", "embed", "balance", "cluster")]
    cfg = load_config(None, [f"workdir={tmp_path}", *dirs, "data.extra_cols=[vendor]", "data.holdout=vendor=zzz"])
    with pytest.raises(StageError, match=r"data.holdout='vendor=zzz' matched none of the 300 downloaded pairs"):
        PackStage(cfg, use_ray=False).run()
    # and balance says so before it clears its last outputs (hours of work at web scale)
    import shutil

    from pipeline.balance import BalanceStage

    shutil.copytree(small_run.stage_dir("balance"), tmp_path / "balance")
    before = sorted(p.name for p in (tmp_path / "balance").iterdir())
    cfg = load_config(None, [f"workdir={tmp_path}", *dirs[:2], "data.extra_cols=[vendor]", "data.holdout=vendor=zzz"])
    with pytest.raises(StageError, match=r"data.holdout='vendor=zzz' matched none of the 300 downloaded pairs"):
        BalanceStage(cfg, use_ray=False).run()
    # nothing cleared (the stage's constructor may add its empty scratch folder `_work`)
    assert set(before) <= {p.name for p in (tmp_path / "balance").iterdir()} and "_DONE" in before
