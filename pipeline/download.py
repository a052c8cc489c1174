"""download: img2dataset fetches every URL into webdataset shards (0000N.tar + 0000N.parquet +
0000N_stats.json), one Ray task per input shard, retried when its worker dies, incremental per shard.

We split the URL list ourselves, streaming it in batches (so unsafe schemes and URLs repeated within a
batch are counted and never fetched; no set of every URL is held; carried columns json cannot hold travel as
text) and hand each shard to img2dataset's own Downloader. A shard is done when its `_verdict.json` is written,
after a check that img2dataset wrote a row for every URL it was given."""
from __future__ import annotations

import contextlib
import gc
import io
import os
import re
import time
from collections import Counter
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from cidistill.core.config import Config
from cidistill.core.errors import StageError, is_write_error
from cidistill.core.runtime import set_env_defaults
from cidistill.core.schema import OOM_SHARD, shard_name
from cidistill.core.stage import STATS, Stage, run_tasks
from cidistill.core.store import Store, redact

from .url_list import (carry_as_text, check_url_list, clean_text_columns, first_columns, plain_text,
                       read_url_batches, url_files)


class DownloadStage(Stage):
    name = "download"
    reads = ("data",)
    # allow_private_addresses only decides what is fetched from now on: setting it (or an upgrade that brought
    # it) never redoes a finished download; the URLs it refused are counted failures, fetched again by --force
    ignores = ("data.holdout", "data.allow_private_addresses")

    def __init__(self, cfg: Config, use_ray: bool = True):
        super().__init__(cfg, use_ray)
        self.d = cfg.data
        self.tmp = Store(self.out.path("_tmp") if self.out.local else self.out.url("_tmp"), create=False)

    def extra_inputs(self) -> dict:
        """The URL list's files, by name and size (reading LAION-sized lists to hash them would cost a pass)."""
        if not self.d.urls:
            return {}
        fs, files = url_files(self.d.urls)
        return {"urls": [[redact(f), fs.size(f)] for f in files]}  # a presigned list signed again: the same

    def carries_zh(self, planned: bool = True) -> bool:
        """Whether the shards carry a Chinese caption: the plan's answer once made; before (or not `planned`),
        the URL list's (a `data.caption_zh_col` other than the default, or listed in extra_cols, must be there)."""
        if planned and self.out.exists("_plan.json"):
            return self.out.read_json("_plan.json").get("caption_zh", "caption_zh" in self.d.extra_cols)
        d = self.d
        return d.caption_zh_col != "caption_zh" or d.caption_zh_col in d.extra_cols \
            or d.caption_zh_col in first_columns(d.urls)

    def _columns(self, zh: bool) -> tuple[list[str], dict[str, str]]:
        """The URL list's columns a shard carries (renamed there to url, caption, caption_zh and the extras),
        and those that must hold text, with the setting that names each."""
        d = self.d
        text = {d.url_col: "data.url_col", d.caption_col: "data.caption_col"}
        if zh:
            text[d.caption_zh_col] = "data.caption_zh_col"
        return [d.url_col, d.caption_col] + ([d.caption_zh_col] if zh else []) + d.extras(), text

    @property
    def columns(self) -> list[str]:
        return self._columns(self.carries_zh())[0]

    def check_inputs(self) -> None:
        """The URL list as this config reads it, before a changed config clears the last download: a typo in
        data.urls must not cost the shards already downloaded."""
        if not self.d.urls:
            raise StageError("data.urls is empty: give a parquet file/folder/glob with url and caption columns")
        check_url_list(self.d.urls, *self._columns(self.carries_zh(planned=False)))

    # -- planning: split the URL list into shards once; a resumed run reuses the plan
    def units(self) -> list[str]:
        if not self.out.exists("_plan.json"):
            self._plan()
        return self.out.read_json("_plan.json")["shards"]

    def _plan(self) -> None:
        """Stream the URL list into input shards of data.samples_per_shard rows (the last of each file
        shorter), rejecting empty URLs, schemes not allowed and URLs repeated within a read batch (repeats
        further apart download twice and balance drops the second copy as an exact duplicate)."""
        if not self.d.urls:
            raise StageError("data.urls is empty: give a parquet file/folder/glob with url and caption columns")
        rejected: Counter = Counter()
        fixed: Counter = Counter()
        as_text: dict[str, str] = {}
        rejected_rows = []
        self.shards, total = [], 0
        allowed = {s.lower() for s in self.d.allowed_schemes}
        zh = self.carries_zh()
        columns, text = self._columns(zh)
        text_cols = columns[1:]
        for _, batches in read_url_batches(self.d.urls, columns, text):
            buffered: list[pa.Table] = []
            for table in batches:
                table = plain_text(table, self.d.url_col)
                keep, seen = [], set()
                for i, u in enumerate(table.column(self.d.url_col).to_pylist()):
                    reason = None
                    if not isinstance(u, str) or not u.strip():
                        reason = "empty_url"
                    elif urlsplit(u.strip()).scheme.lower() not in allowed:
                        reason = "scheme_not_allowed"
                    elif u in seen:
                        reason = "duplicate_url"
                    if reason:
                        rejected[reason] += 1
                        if len(rejected_rows) < 100_000:  # the first ones as examples; every one is counted
                            rejected_rows.append({"url": str(u)[:2000], "reason": reason})
                    else:
                        seen.add(u)
                        keep.append(i)
                table = clean_text_columns(table.take(pa.array(keep, pa.int64())), text_cols, self.d.max_caption_chars, fixed)
                table = carry_as_text(table, self.d.extras(), as_text)
                total += table.num_rows
                buffered = self._emit_full(buffered + [table])
            if buffered:
                self._write_input_shard(pa.concat_tables(buffered))
        if not total:
            raise StageError(f"data.urls: no URL to download in {self.d.urls!r} "
                             f"({sum(rejected.values())} rejected: {dict(rejected) or 'the file has no rows'})")
        if len(self.shards) >= 10 ** OOM_SHARD:
            raise StageError(f"{len(self.shards)} shards: raise data.samples_per_shard (at most {10 ** OOM_SHARD - 1} shards)")
        if rejected_rows:
            self.out.write_table("rejected.parquet", pa.Table.from_pylist(rejected_rows))
        self.out.write_json("_plan.json", {"shards": self.shards, "caption_zh": zh, "urls_accepted": total,
                                           "urls_rejected": dict(rejected), "text_fixed": dict(fixed),
                                           "carried_as_text": as_text})

    def _emit_full(self, buffered: list[pa.Table]) -> list[pa.Table]:
        """Write every full input shard of the buffered rows; return the rest."""
        t = pa.concat_tables(buffered) if len(buffered) > 1 else buffered[0]
        n = self.d.samples_per_shard
        while t.num_rows >= n:
            self._write_input_shard(t.slice(0, n))
            t = t.slice(n)
        return [t] if t.num_rows else []

    def _write_input_shard(self, part: pa.Table) -> None:
        d = self.d
        names = {d.url_col: "url", d.caption_col: "caption", d.caption_zh_col: "caption_zh"}
        part = part.rename_columns([names.get(c, c) for c in part.column_names])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, part.schema) as w:
            w.write_table(part)
        self.tmp.write_bytes(f"{len(self.shards)}.feather", sink.getvalue().to_pybytes())
        self.shards.append(shard_name(len(self.shards)))

    # -- work
    def _downloader(self):
        set_env_defaults()
        from img2dataset.downloader import Downloader
        from img2dataset.resizer import Resizer
        from img2dataset.writer import WebDatasetSampleWriter

        d = self.d
        # img2dataset's order: extras, caption, url
        column_list = (["caption_zh"] if self.carries_zh() else []) + self.d.extras() + ["caption", "url"]
        resizer = Resizer(image_size=d.image_size, resize_mode=d.resize_mode, resize_only_if_bigger=False,
                          upscale_interpolation="lanczos", downscale_interpolation="area", encode_quality=9 if d.encode_format == "png" else 95,
                          encode_format=d.encode_format, skip_reencode=False, disable_all_reencoding=False,
                          min_image_size=0, max_image_area=float(d.max_image_pixels), max_aspect_ratio=float("inf"))
        return Downloader(
            sample_writer_class=WebDatasetSampleWriter, resizer=resizer, thread_count=d.thread_count,
            save_caption=True, extract_exif=False, output_folder=self.out.url("").rstrip("/"), column_list=column_list,
            timeout=d.timeout, number_sample_per_shard=d.samples_per_shard, oom_shard_count=OOM_SHARD,
            compute_hash="sha256", verify_hash_type=None, encode_format=d.encode_format, retries=d.retries,
            user_agent_token="cidistill", disallowed_header_directives=list(d.disallowed_header_directives) or None)

    def unit_done(self, unit: str) -> bool:
        return self.out.exists(f"{unit}_verdict.json")

    def run_units(self, pending: list[str]) -> dict[str, str]:
        if any(not self.tmp.exists(f"{int(s)}.feather") for s in pending):
            self._plan()  # the input shards were cleaned after a finished run: rebuild them (deterministic)
        downloader = self._downloader()
        d = {k: getattr(self.d, k) for k in ("max_image_pixels", "allowed_schemes", "allow_private_addresses",
                                             "deadline", "max_bytes", "transient_attempts")}
        items = [(downloader, int(s), self.tmp.url(f"{int(s)}.feather"), d) for s in pending]
        results = run_tasks(_download_one, items, use_ray=self.use_ray, retries=self.d.shard_retries,
                            desc="download")
        full = [r.exc for r in results if not r.ok and is_write_error(r.exc)]
        if full:  # img2dataset's writer on a full disk: the CLI's exit-3 message; finished shards stay done
            raise full[0]
        return {shard_name(r.item[1]): r.error for r in results if not r.ok}

    def finish(self, stats: dict) -> dict:
        plan = self.out.read_json("_plan.json")
        stats["urls_rejected"] = plan["urls_rejected"]
        stats["urls_accepted"] = plan["urls_accepted"]
        stats["text_fixed"] = plan.get("text_fixed", {})
        stats["carried_as_text"] = plan.get("carried_as_text", {})
        stats["urls_total"] = plan["urls_accepted"] + sum(plan["urls_rejected"].values())
        # img2dataset catches per-sample exceptions and only prints them: check nothing went missing
        rows = sum(pq.read_metadata(self.out.fs.open(self.out.path(f"{s}.parquet"), "rb")).num_rows
                   for s in plan["shards"] if self.unit_done(s))  # a failed shard's files may be cut short
        stats["rows_written"] = rows
        verdicts = [self.out.read_json(f"{s}_verdict.json") for s in plan["shards"] if self.unit_done(s)]
        for k in ("failed_transient", "failed_permanent"):
            stats[k] = sum(v[k] for v in verdicts)
        stats["shards_retried"] = sum(v["attempts"] > 1 for v in verdicts)
        stats["samples_lost"] = stats.get("count", 0) - rows
        for k in ("start_time", "end_time", "duration"):
            stats.pop(k, None)
        if not stats["failed_shards"] and self.tmp.fs.exists(self.tmp.root):
            self.tmp.fs.rm(self.tmp.root, recursive=True)
        return stats

    def check(self, stats: dict) -> None:
        if not stats.get("successes"):
            top = sorted(stats.get("status_dict", {}).items(), key=lambda kv: -kv[1])[:2]
            raise StageError(f"download: none of the {stats['urls_accepted']} URLs was downloaded ("
                             + "; ".join(f"{n}x {msg}" for msg, n in top) + f"); see {self.out.url(STATS)}. Check "
                             "the URLs and the servers, then download again with --force")

    def summary(self, stats: dict) -> str:
        return (f"{stats.get('successes', 0)} ok / {stats.get('failed_to_download', 0) + stats.get('failed_to_resize', 0)}"
                f" failed / {sum(stats['urls_rejected'].values())} rejected URLs, {stats['shards_done']} shards")


def _download_one(item) -> str:
    """One Ray task: img2dataset downloads one shard, fetching with pipeline/fetch.py. The URLs of a shard
    that failed for a transient reason (refused, reset, timeout, DNS, 5xx) are fetched again and merged in
    (pipeline/retry.py), up to data.transient_attempts attempts over all runs (counted in _tmp/); only then is
    its verdict written, which is what marks it done, so a shard written while its run was dying is redone
    by the next run."""
    downloader, shard_id, feather, d = item
    set_env_defaults()
    os.environ.setdefault("CV_IO_MAX_IMAGE_PIXELS", str(d["max_image_pixels"]))  # OpenCV's own decode-size guard
    import img2dataset.downloader as i2d

    from .fetch import make_fetcher
    from .retry import retry_transient

    # img2dataset calls this module function for every URL: ours checks redirects, addresses, a deadline and a
    # size cap
    i2d.download_image = make_fetcher(d["allowed_schemes"], d["deadline"], d["max_bytes"], d["allow_private_addresses"])
    out = Store(downloader.output_folder)
    tmp = Store(feather.rsplit("/", 1)[0])
    shard = shard_name(shard_id)
    # attempts that ended with transient failures, over all runs (a run killed mid-shard does not count)
    failed_tries = tmp.read_json(f"{shard}.attempts") if tmp.exists(f"{shard}.attempts") else 0
    _download_copy(downloader, shard_id, feather)
    while True:
        verdict = shard_verdict(out, shard, failed_tries + 1)
        if not verdict["failed_transient"] or failed_tries + 1 >= d["transient_attempts"]:
            break
        failed_tries += 1
        tmp.write_json(f"{shard}.attempts", failed_tries)
        time.sleep(min(2 ** failed_tries, 30))  # a server that was down for a moment: try those URLs again
        retry_transient(downloader, shard_id, feather, _download_copy)
    from cidistill.core import faults

    faults.point()
    out.write_json(f"{shard}_verdict.json", verdict)  # last: the shard's done-marker
    return shard


def _download_copy(downloader, shard_id: int, feather: str) -> None:
    """img2dataset deletes the input file it was given: hand it a copy, so that a retry after a worker died
    late (shard written, task not yet returned) still finds the shard's URLs."""
    import uuid

    import fsspec

    fs, path = fsspec.core.url_to_fs(feather)
    attempt = f"{path}.attempt-{uuid.uuid4().hex[:8]}"
    fs.cp_file(path, attempt)  # one file: fs.copy expands its path as a glob (a work folder named `run [1]`)
    printed, failed = io.StringIO(), None
    try:
        # img2dataset prints a traceback for each sample it could not write, and counts it as a success
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(printed):
            try:
                downloader.download_shard((shard_id, feather.replace(path, attempt) if feather.endswith(path) else attempt))
            except Exception as e:  # e.g. its writer on a full disk, which leaves the shard's tar open
                failed = _without_frames(e)
                gc.collect()  # ... closed here, its "Exception ignored" tracebacks printed into `printed`
    finally:
        if fs.exists(attempt):
            fs.rm_file(attempt)
    if failed is not None:
        raise failed
    with fs.open(path, "rb") as fh:
        expected = pa.ipc.open_file(fh).read_all().num_rows
    out = Store(downloader.output_folder)
    shard = shard_name(shard_id)
    written = out.num_rows(f"{shard}.parquet") if out.exists(f"{shard}.parquet") else 0
    if written < expected:
        why = Counter(m.group(1).strip() for m in re.finditer(r"^Sample \d+ failed to download: (.*)$",
                                                              printed.getvalue(), re.M))
        top = "; ".join(f"{n}x {msg[:200]}" for msg, n in why.most_common(2)) or "no reason printed"
        codes = [int(m.group(1)) for msg in why for m in [re.match(r"\[Errno (\d+)\]", msg)] if m]
        codes = [n for n in codes if is_write_error(OSError(n, ""))]
        if codes:  # its writer failed sample by sample on a full disk: the CLI's exit-3 message
            raise OSError(codes[0], os.strerror(codes[0]), out.path(f"{shard}.tar"))
        raise StageError(f"download shard {shard}: img2dataset wrote {written} of its {expected} samples ({top})")


def _without_frames(e: BaseException) -> BaseException:
    """The exception (and those it chains) without the tracebacks that keep the failed call's objects alive."""
    x = e
    while x is not None:
        x.__traceback__ = None
        x = x.__cause__ or x.__context__
    return e


def shard_verdict(out: Store, shard: str, attempt: int) -> dict:
    """A written shard's failures, transient (worth another attempt) apart from permanent."""
    from .fetch import is_transient

    t = out.read_table(f"{shard}.parquet", columns=["status", "error_message"])
    errors = [e or s for s, e in zip(t.column("status").to_pylist(), t.column("error_message").to_pylist())
              if s != "success"]
    transient = sum(is_transient(e) for e in errors)
    return {"failed_transient": transient, "failed_permanent": len(errors) - transient, "attempts": attempt}
