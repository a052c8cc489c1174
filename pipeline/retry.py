"""A download shard's transient failures fetched again: only those URLs, by img2dataset into a scratch folder,
then merged into the shard under their own keys (its tar, its parquet and img2dataset's counts, each file
replaced whole). A web-scale shard nearly always holds a few timeouts: fetching all of it again, as this
stage did at first, multiplied the download by data.transient_attempts."""
from __future__ import annotations

import copy
import json
import math
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from cidistill.core.packed import iter_tar_samples, tar_bytes
from cidistill.core.schema import shard_name
from cidistill.core.store import Store, join

from .fetch import is_transient


def transient_keys(t: pa.Table) -> list[str]:
    """The keys of a shard's rows that failed for a reason worth another attempt."""
    return [k for k, s, e in zip(t.column("key").to_pylist(), t.column("status").to_pylist(),
                                 t.column("error_message").to_pylist()) if s != "success" and is_transient(e or s)]


def retry_transient(downloader, shard_id: int, feather: str, download) -> int:
    """Fetch the shard's transient failures again (`download(downloader, shard_id, feather)` runs img2dataset
    and checks what it wrote) and merge them in; returns how many were fetched again."""
    from img2dataset.downloader import compute_key

    out, shard = Store(downloader.output_folder), shard_name(shard_id)
    main = out.read_table(f"{shard}.parquet")
    redo = transient_keys(main)
    if not redo:
        return 0
    src_store, src_name = Store(feather.rsplit("/", 1)[0]), feather.rsplit("/", 1)[1]
    with src_store.fs.open(src_store.path(src_name), "rb") as fh:
        src = pa.ipc.open_file(fh).read_all()
    oom = math.ceil(math.log10(downloader.number_sample_per_shard))

    def key(i: int) -> str:
        return compute_key(i, shard_id, oom, downloader.oom_shard_count)

    index = {key(i): i for i in range(src.num_rows)}
    rows = [index[k] for k in redo]
    scratch = Store(join(src_store.uri, f"retry-{shard}"))
    if scratch.fs.exists(scratch.root):
        scratch.fs.rm(scratch.root, recursive=True)  # a retry killed half-way
    sub = src.take(pa.array(rows, pa.int64()))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, sub.schema) as w:
        w.write_table(sub)
    scratch.write_bytes(src_name, sink.getvalue().to_pybytes())
    again = copy.copy(downloader)
    again.output_folder = scratch.uri.rstrip("/")
    download(again, shard_id, scratch.url(src_name))
    back = {key(j): key(i) for j, i in enumerate(rows)}  # the retry's keys count from 0: the shard's own
    new = scratch.read_table(f"{shard}.parquet")
    new = new.set_column(new.column_names.index("key"), "key",
                         pa.array([back[k] for k in new.column("key").to_pylist()], pa.string()))
    kept = main.filter(pc.invert(pc.is_in(main.column("key"), pa.array(redo, pa.string()))))
    merged = pa.concat_tables([kept, new.cast(kept.schema)]).sort_by("key")
    samples = {s["__key__"]: s for s in iter_tar_samples(out, f"{shard}.tar")}
    for s in iter_tar_samples(scratch, f"{shard}.tar"):
        s["__key__"] = k = back[s["__key__"]]
        if "json" in s:
            s["json"] = json.dumps(dict(json.loads(s["json"]), key=k), indent=4).encode()
        samples[k] = s
    out.write_bytes(f"{shard}.tar", tar_bytes([samples[k] for k in sorted(samples)]))
    out.write_table(f"{shard}.parquet", merged)
    out.write_json(f"{shard}_stats.json", shard_counts(merged, out.read_json(f"{shard}_stats.json")))
    scratch.fs.rm(scratch.root, recursive=True)
    return len(redo)


def shard_counts(t: pa.Table, old: dict) -> dict:
    """img2dataset's per-shard counts, recomputed from the merged shard."""
    status = t.column("status").to_pylist()
    why = Counter("success" if s == "success" else (e or s) for s, e in zip(status, t.column("error_message").to_pylist()))
    return dict(old, count=t.num_rows, successes=status.count("success"),
                failed_to_download=status.count("failed_to_download"),
                failed_to_resize=status.count("failed_to_resize"), status_dict=dict(why))
