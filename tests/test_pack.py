"""The curated dataset (pack stage) and the stream the trainer reads from it."""
import itertools
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from cidistill.core.packed import iter_tar_samples, sample_fields, split_shards
from cidistill.core.schema import emb_matrix, holdout_mask
from cidistill.core.store import Store
from kd.stream import StreamSpec, data_position, lane_samples, lane_shards


def _stage_rows(cfg, stage, cols):
    return {r["key"]: r for p in sorted(Path(cfg.stage_dir(stage)).glob("0*.parquet"))
            for r in pq.read_table(p, columns=cols).to_pylist()}


def _packed(cfg, split):
    store = Store(cfg.stage_dir("pack"))
    return [sample_fields(s) for name, _ in split_shards(store, split) for s in iter_tar_samples(store, name)]


def test_packed_train_split_is_exactly_the_kept_training_pairs_with_their_embeddings(small_run):
    kept = {k for k, r in _stage_rows(small_run, "balance", ["key", "kept"]).items() if r["kept"]}
    held = set()
    for p in sorted(Path(small_run.stage_dir("download")).glob("0*.parquet")):
        t = pq.read_table(p)
        t = t.filter(pc.equal(t.column("status"), "success"))
        held |= set(t.filter(holdout_mask(small_run, t)).column("key").to_pylist())
    train, evals = _packed(small_run, "train"), _packed(small_run, "eval")
    keys = [s["key"] for s in train]
    assert len(keys) == len(set(keys)), "a pair packed twice"
    assert set(keys) == kept - held and not set(keys) & held
    assert sorted(s["key"] for s in evals) == sorted(held)

    emb = {}
    for p in sorted(Path(small_run.stage_dir("embed")).glob("0*.parquet")):
        t = pq.read_table(p, columns=["key", "image_emb", "text_emb", "text_emb_zh"])
        for k, a, b, c in zip(t.column("key").to_pylist(), emb_matrix(t.column("image_emb")),
                              emb_matrix(t.column("text_emb")), emb_matrix(t.column("text_emb_zh"))):
            emb[k] = (a, b, c)
    clusters = _stage_rows(small_run, "cluster", ["key", "cluster_id"])
    captions = _stage_rows(small_run, "download", ["key", "caption", "caption_zh"])
    for s in train:
        a, b, c = emb[s["key"]]
        assert s["t_img"].dtype == np.float16 and np.array_equal(s["t_img"].astype(np.float32), a)
        assert np.array_equal(s["t_txt"].astype(np.float32), b) and np.array_equal(s["t_txt_zh"].astype(np.float32), c)
        assert s["meta"]["cluster_id"] == clusters[s["key"]]["cluster_id"]
        assert (s["caption"], s["caption_zh"]) == (captions[s["key"]]["caption"], captions[s["key"]]["caption_zh"])
    manifest = pq.read_table(Path(small_run.stage_dir("pack")) / "train" / "manifest.parquet").to_pylist()
    assert [m["key"] for m in manifest] == keys  # shard order, then row order
    assert all(m["row"] == i for _, rows in itertools.groupby(manifest, key=lambda m: m["shard"])
               for i, m in enumerate(rows))


READER = """
import glob, json, sys
import webdataset as wds
ds = wds.WebDataset(sorted(glob.glob(glob.escape(sys.argv[1]) + "/train/shard-*.tar")), shardshuffle=False).decode("rgb8")
rows = [(s["__key__"], s["txt"], s["json"]["cluster_id"], s["teacher_image_emb.npy"].shape, s["png"].shape) for s in ds]
assert not [m for m in sys.modules if m.split(".")[0] in ("cidistill", "kd", "pipeline", "data_cards")]
print(json.dumps(rows))
"""


def test_packed_shards_load_with_plain_webdataset_in_a_process_without_the_project(small_run, tmp_path):
    (tmp_path / "read.py").write_text(READER)
    # webdataset takes a shard's path as a URL: the `#` of the suite's work folder would start a fragment
    (tmp_path / "pack").symlink_to(small_run.stage_dir("pack"))
    r = subprocess.run([sys.executable, str(tmp_path / "read.py"), str(tmp_path / "pack")], cwd=tmp_path,
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    want = [(s["key"], s["caption"]) for s in _packed(small_run, "train")]
    assert [(k, t) for k, t, *_ in rows] == want
    assert {tuple(e) for *_, e, _ in rows} == {(384,)} and all(len(img) == 3 for *_, img in rows)


def _spec(cfg, streams=2, batch=16, block=40):
    tc = SimpleNamespace(streams=streams, batch_size=batch, shuffle_block=block, seed=3)
    return StreamSpec.of(cfg.stage_dir("pack"), "train", tc)


def test_stream_resumes_mid_epoch_at_the_exact_next_sample(small_run):
    spec = _spec(small_run)
    for lane in range(spec.streams):
        full = [s["__key__"] for s in itertools.islice(lane_samples(spec, lane, 0), 400)]
        for start in (1, 39, 40, 95, 233):
            assert [s["__key__"] for s in itertools.islice(lane_samples(spec, lane, start), 400 - start)] == full[start:]
    pos = data_position(spec, 9)  # a checkpoint's record: lane epoch, shard, row and block
    assert [p["lane"] for p in pos] == [0, 1] and all(p["in_block"] < spec.block for p in pos)


def test_each_lane_epoch_reads_its_shards_once_and_no_block_repeats_a_pair(small_run):
    spec = _spec(small_run, block=1000)  # a block larger than an epoch: still cut at the epoch's end
    for lane in range(spec.streams):
        it = lane_samples(spec, lane, 0)
        for epoch in range(3):
            shards = lane_shards(spec, lane, epoch)
            want = sorted(s["__key__"] for name, _ in shards for s in iter_tar_samples(Store(spec.root), name))
            got = [s["__key__"] for s in itertools.islice(it, sum(n for _, n in shards))]
            assert sorted(got) == want, (lane, epoch)
    every = {name for lane in range(spec.streams) for name, _ in lane_shards(spec, lane, 0)}
    assert every == {name for name, _ in spec.shards}  # the lanes of one epoch split the shards between them


def _char_tokens(texts):
    return torch.tensor([[ord(c) for c in t[:8].ljust(8)] for t in texts])


def test_loader_processes_hand_over_exactly_the_in_process_batches(small_run):
    """Two loader processes whose shared-memory slots are refilled over and over (18 steps, 6 slots) give the
    batches the trainer's own process makes, and a batch already taken is never written to again."""
    from kd.stream import BatchMaker, worker_batches

    spec = _spec(small_run)
    make = BatchMaker(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), _char_tokens, None, True, True, True, 5)
    got, want = (list(itertools.islice(worker_batches(spec, make, 0, 1, 3, loader_workers=n), 18)) for n in (2, 0))
    assert [b["step"] for b in got] == list(range(3, 21))
    for g, w in zip(got, want):
        assert g.keys() == w.keys() >= {"x", "tokens", "tokens_zh", "t_img", "t_txt", "cluster_id", "keys"}
        for k, v in w.items():
            assert torch.equal(g[k], v) if isinstance(v, torch.Tensor) else g[k] == v, (w["step"], k)


def test_npy_members_read_as_np_load_reads_them():
    """The loader's cached-header reader of .npy members gives np.load's arrays (other layouts fall back)."""
    import io

    from cidistill.core.packed import npy_array, npy_bytes

    for a in (np.linspace(-1, 1, 384).astype(np.float16), np.arange(6).reshape(2, 3),
              np.asfortranarray(np.arange(6.0).reshape(2, 3)), np.zeros(0, np.float32)):
        buf = io.BytesIO()
        np.save(buf, a)
        got = npy_array(buf.getvalue())
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)
    got = npy_array(npy_bytes(np.ones(4)))
    got[0] = 2  # a copy the caller may write to
    assert got.dtype == np.float16 and got.tolist() == [2, 1, 1, 1]


def test_tar_reader_reads_what_tarfile_reads_and_names_a_corrupt_shard(tmp_path):
    """Our tar parser (the training loader's samples, the download shards' images) against Python's tarfile on
    ustar, GNU and pax archives (long and non-ASCII names, directories, links, empty members), with skipped
    samples; a flipped header byte and a cut-off shard are one-line errors naming the shard."""
    import io
    import random
    import tarfile

    import pytest

    from cidistill.core.errors import StageError
    from cidistill.core.images import read_tar_images

    def by_tarfile(data):
        out = []
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
            for m in tar:
                if m.isfile():
                    key, _, ext = m.name.rsplit("/", 1)[-1].partition(".")
                    if not out or out[-1]["__key__"] != key:
                        out.append({"__key__": key})
                    out[-1][ext] = tar.extractfile(m).read()
        return out

    rnd = random.Random(0)
    store = Store(str(tmp_path))
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
            d = tarfile.TarInfo("folder")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
            for i in range(12):
                key = f"k{i}" + ("x" * 150 if i % 3 == 0 and fmt != tarfile.USTAR_FORMAT else "") + \
                    ("é" if i % 4 == 0 and fmt == tarfile.PAX_FORMAT else "")
                prefix = "dir/" * (30 if i % 5 == 0 else 1)
                for ext in ("png", "txt", "zh.txt"):
                    payload = rnd.randbytes(rnd.choice([0, 1, 511, 512, 513, 1500]))
                    info = tarfile.TarInfo(f"{prefix}{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                if i == 7:
                    link = tarfile.TarInfo(prefix + "link")
                    link.type, link.linkname = tarfile.SYMTYPE, "x" * (50 if fmt == tarfile.USTAR_FORMAT else 200)
                    tar.addfile(link)
        data = buf.getvalue()
        store.write_bytes("x.tar", data)
        want = by_tarfile(data)
        assert len(want) == 12 and list(iter_tar_samples(store, "x.tar")) == want, fmt
        assert list(iter_tar_samples(store, "x.tar", skip=5)) == want[5:]
        assert read_tar_images(store, "x.tar") == {s["__key__"]: s["png"] for s in want}  # download shards' reader
        bad = bytearray(data)
        bad[600] ^= 1
        store.write_bytes("x.tar", bytes(bad))
        with pytest.raises(StageError, match="x.tar: bad checksum"):
            list(iter_tar_samples(store, "x.tar"))
        with pytest.raises(StageError, match="x.tar: bad checksum"):
            read_tar_images(store, "x.tar")
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            m = [m for m in tar.getmembers() if m.size > 100][3]
        for cut in (m.offset + 100, m.offset_data + m.size // 2):  # inside a header, inside a member's bytes
            store.write_bytes("x.tar", data[:cut])
            with pytest.raises(StageError, match="x.tar: .*trunc"):
                list(iter_tar_samples(store, "x.tar"))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo("k" * 120 + ".txt")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"a"))
    data = bytearray(buf.getvalue())
    assert data[156:157] == b"x"  # a pax header first, its records in the next block (not checksummed)
    data[512:514] = b"zz"
    store.write_bytes("x.tar", bytes(data))
    with pytest.raises(StageError, match="x.tar: malformed pax header"):
        list(iter_tar_samples(store, "x.tar"))


def test_a_batch_larger_than_a_stream_can_fill_without_repeats_is_one_line(small_run, tmp_path):
    """`train.batch_size` above the training pairs (256 on 132 of a user's pairs) trained with each batch holding
    pairs twice, each its own negative in the contrastive losses. It is refused in one line, before the last
    trained student is cleared."""
    import dataclasses
    import shutil

    from cidistill.app.registry import run_stages
    from cidistill.core.errors import StageError

    shards = _spec(small_run).shards
    fewest = sum(sorted(n for _, n in shards)[:len(shards) // 2])
    _spec(small_run, batch=2 * fewest).check_batch()  # the most that fits
    with pytest.raises(StageError, match=rf"train.batch_size={2 * fewest + 2} is more than .* as 2 stream\(s\) of "
                                         rf"{fewest} or more; lower train.batch_size"):
        _spec(small_run, batch=2 * fewest + 2).check_batch()
    train = tmp_path / "train"  # the finished training, in a folder of its own beside the small run's inputs
    shutil.copytree(small_run.stage_dir("train"), train)
    before = (train / "model.safetensors").read_bytes()
    cfg = dataclasses.replace(small_run, dirs={**small_run.dirs, "train": str(train)},
                              train=dataclasses.replace(small_run.train, batch_size=10 ** 6))
    with pytest.raises(StageError, match="train.batch_size=1000000 is more than"):
        run_stages(cfg, ["train"], use_ray=False)
    assert (train / "model.safetensors").read_bytes() == before and (train / "_DONE").exists()
