"""embed: the teacher's view of every pair, computed once. Ray Data reads the download shards, a
`map_batches` actor pool (the model loads once per actor) embeds images and EN/ZH captions, and the driver
writes one parquet per shard (schema.embed_schema) as soon as all of that shard's rows are back."""
from __future__ import annotations

import hashlib
import threading
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from .config import Config, TeacherConfig
from .schema import embed_schema
from .stage import Stage, StageError, Store, shard_stats_name


def _read_shard(row: dict) -> list[dict]:
    """One download shard -> rows of (shard, key, image bytes, captions). Runs as a Ray Data task."""
    from kd.data import read_tar_images

    shard, folder = row["shard"], row["folder"]
    store = Store(folder)
    t = store.read_table(f"{shard}.parquet")
    # key order, not img2dataset's (thread completion) order: a batch's rows, and so its numerics, are then
    # the same in every run (a resumed shard is byte-identical)
    t = t.filter(pc.equal(t.column("status"), "success")).sort_by("key")
    images = read_tar_images(store, f"{shard}.tar")
    zh = t.column("caption_zh").to_pylist() if "caption_zh" in t.column_names else [None] * t.num_rows
    return [{"shard": shard, "key": k, "image": images.get(k, b""), "caption": c or "", "caption_zh": z or ""}
            for k, c, z in zip(t.column("key").to_pylist(), t.column("caption").to_pylist(), zh)]


class TeacherEmbedder:
    """Loads the teacher once; embeds batches. Also usable in-process (tests, eval) via `embed`."""

    def __init__(self, teacher: dict):
        import torch

        from kd.models import create

        tc = TeacherConfig(**teacher)
        torch.set_num_threads(max(1, int(tc.threads or tc.cpus_per_actor)))
        self.device = "cuda" if tc.gpus_per_actor and torch.cuda.is_available() else "cpu"
        self.lm = create(tc.model, tc.pretrained, tc.model_config, device=self.device)
        self.lm.model.eval()
        prec = tc.precision if tc.precision != "auto" else ("bf16" if self.device == "cuda" else "fp32")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(prec)
        self._model_lock = threading.Lock()  # two calls in flight: one prepares while the other runs the model

    def prepare(self, images: list[bytes], captions: list[str], captions_zh: list[str]) -> dict:
        """Decode, preprocess, hash and tokenise: CPU work that runs beside the previous batch's forward."""
        from PIL import Image

        from kd.data import decode_rgb

        ok, pixels, hashes, errors = [], [], [], []
        for b in images:
            try:
                arr = decode_rgb(b, 0)
                pixels.append(self.lm.preprocess_val(Image.fromarray(arr)))
                hashes.append(hashlib.sha256(arr.tobytes()).hexdigest())
                ok.append(True)
                errors.append("")
            except Exception as e:  # corrupt image: counted, not fatal
                ok.append(False)
                hashes.append("")
                errors.append(f"undecodable: {type(e).__name__}")
        out = {"n": len(images), "ok": np.array(ok), "image_hash": np.array(hashes, dtype=object),
               "error": np.array(errors, dtype=object), "pixels": pixels, "tokens": {}}
        for col, texts in (("text_emb", captions), ("text_emb_zh", captions_zh)):
            idx = [i for i, t in enumerate(texts) if t and t.strip()]
            # a caption repeated in the batch (web alt-text repeats; the demo's styles share theirs) runs once
            uniq, inv = np.unique(np.array([texts[i] for i in idx], dtype=object), return_inverse=True)
            out["tokens"][col] = (idx, inv, self.lm.tokenizer(uniq.tolist()) if idx else None)
        return out

    def forward(self, prep: dict) -> dict:
        import torch
        import torch.nn.functional as F

        from kd.models import encode_text

        n, dim = prep["n"], self.lm.embed_dim
        out = {k: prep[k] for k in ("ok", "image_hash", "error")}
        with self._model_lock, torch.no_grad(), \
                torch.autocast(self.device, dtype=self.dtype, enabled=self.dtype is not None):
            img = np.zeros((n, dim), np.float32)
            if prep["pixels"]:
                x = torch.stack(prep["pixels"]).to(self.device)
                img[np.flatnonzero(out["ok"])] = F.normalize(self.lm.model.encode_image(x).float(), dim=-1).cpu().numpy()
            out["image_emb"] = img
            for col, (idx, inv, tok) in prep["tokens"].items():
                emb = np.full((n, dim), np.nan, np.float32)
                if idx:
                    uniq = F.normalize(encode_text(self.lm.model, tok.to(self.device)).float(), dim=-1).cpu().numpy()
                    emb[idx] = uniq[inv]
                out[col] = emb
        return out

    def embed(self, images: list[bytes], captions: list[str], captions_zh: list[str]) -> dict:
        return self.forward(self.prepare(images, captions, captions_zh))

    def __call__(self, batch: dict) -> dict:
        res = self.embed(list(batch["image"]), [str(c) for c in batch["caption"]], [str(c) for c in batch["caption_zh"]])
        res.update(shard=batch["shard"], key=batch["key"])
        return res


def _to_table(rows: dict[str, list], dim: int) -> pa.Table:
    def col(name):
        arr = np.stack(rows[name]).astype(np.float16)
        valid = ~np.isnan(arr).any(1)
        flat = pa.array(np.nan_to_num(arr).reshape(-1), pa.float16())
        return pa.FixedSizeListArray.from_arrays(flat, dim, mask=pa.array(~valid))

    t = pa.table({"key": pa.array(rows["key"], pa.string()), "image_emb": col("image_emb"),
                  "text_emb": col("text_emb"), "text_emb_zh": col("text_emb_zh"),
                  "image_hash": pa.array(rows["image_hash"], pa.string())}, schema=embed_schema(dim))
    return t.sort_by("key")


class EmbedStage(Stage):
    def __init__(self, cfg: Config, use_ray: bool = True):
        self.cfg, self.use_ray = cfg, use_ray
        super().__init__(name="embed", out_dir=cfg.stage_dir("embed"), config={"teacher": vars(cfg.teacher)})
        self.src = Store(cfg.stage_dir("download"))

    def shards(self) -> list[str]:
        if not self.src.exists("_DONE"):
            raise StageError(f"embed needs a finished download stage in {self.src.uri}")
        return [n[:-4] for n in self.src.glob("*.tar")]

    def _expected(self, shard: str) -> int:
        t = self.src.read_table(f"{shard}.parquet", columns=["status"])
        return int(pc.sum(pc.equal(t.column("status"), "success")).as_py() or 0)

    def _check_width(self, dim: int) -> None:
        done = self.out.glob("*.parquet")
        if done:
            with self.out.fs.open(self.out.path(done[0]), "rb") as f:
                have = pq.read_schema(f).field("image_emb").type.list_size
            if have != dim:
                raise StageError(f"teacher embeds {dim}-d but {self.out.uri} already holds {have}-d embeddings "
                                 f"from another teacher: use another embed folder or --force")

    def run_shards(self, pending: list[str]) -> dict[str, str]:
        tc = self.cfg.teacher
        expected = {s: self._expected(s) for s in pending}
        buffers: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        seen: dict[str, int] = defaultdict(int)
        for s in [s for s in pending if expected[s] == 0]:
            self._write(s, {}, {}, 0)
        work = [s for s in pending if expected[s] > 0]
        if not work:
            return {}
        bar = tqdm(total=sum(expected[s] for s in work), desc="embed", unit="img", leave=False)
        dim = None
        for batch in self._batches(work):
            if dim is None:
                dim = batch["image_emb"].shape[1]
                self._check_width(dim)
            for i in range(len(batch["key"])):
                s = str(batch["shard"][i])
                seen[s] += 1
                if not batch["ok"][i]:
                    errors[s][str(batch["error"][i]).split(":")[0]] += 1
                else:
                    b = buffers[s]
                    for c in ("key", "image_hash", "image_emb", "text_emb", "text_emb_zh"):
                        b[c].append(batch[c][i])
                    if np.isnan(batch["text_emb"][i]).any():
                        errors[s]["empty_caption"] += 1
                    if np.isnan(batch["text_emb_zh"][i]).any():
                        errors[s]["no_zh_caption"] += 1
                if seen[s] == expected[s]:  # shard complete: write it now (resume unit)
                    self._write(s, buffers.pop(s, {}), errors.pop(s, {}), dim)
            bar.update(len(batch["key"]))
        bar.close()
        missing = {s: f"{seen[s]}/{expected[s]} rows came back" for s in work if not self.shard_done(s)}
        return missing

    def _batches(self, shards: list[str]):
        tc = self.cfg.teacher
        kwargs = {"teacher": vars(tc)}
        if not self.use_ray:
            emb = TeacherEmbedder(**kwargs)
            for s in shards:
                rows = _read_shard({"shard": s, "folder": self.src.uri})
                for i in range(0, len(rows), tc.batch_size):
                    part = rows[i:i + tc.batch_size]
                    yield emb({k: [r[k] for r in part] for k in part[0]})
            return
        import ray

        ds = ray.data.from_items([{"shard": s, "folder": self.src.uri} for s in shards], override_num_blocks=len(shards))
        ds = ds.flat_map(_read_shard)
        # actors take cpus_per_actor each; Ray Data's read tasks need the rest (a pool on every core hangs)
        # two calls per actor at once: batch N+1 is decoded and tokenised while batch N is in the model
        # (TeacherEmbedder.forward holds a lock, so one forward at a time and torch keeps its threads)
        pool = ray.data.ActorPoolStrategy(size=tc.num_actors, max_concurrent_calls_per_actor=2,
                                          enable_true_multi_threading=True)
        ds = ds.map_batches(TeacherEmbedder, fn_constructor_kwargs=kwargs, batch_size=tc.batch_size, compute=pool,
                            num_cpus=tc.cpus_per_actor, num_gpus=tc.gpus_per_actor or None, batch_format="numpy")
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")

    def _write(self, shard: str, rows: dict, errs: dict, dim: int) -> None:
        if rows:
            self.out.write_table(f"{shard}.parquet", _to_table(rows, dim))
        else:
            self.out.write_table(f"{shard}.parquet", embed_schema(max(dim, 1)).empty_table())
        self.out.write_json(shard_stats_name(shard), {"embedded": len(rows.get("key", [])), **dict(errs)})

    def finish(self, stats: dict) -> dict:
        stats["teacher"] = f"{self.cfg.teacher.model}:{self.cfg.teacher.pretrained}"
        return stats

    def summary(self, stats: dict) -> str:
        return (f"{stats.get('embedded', 0)} pairs embedded, {stats.get('undecodable', 0)} undecodable, "
                f"{stats.get('empty_caption', 0)} empty captions, {stats['shards_done']} shards")


def run_stage(cfg: Config, force: bool = False, use_ray: bool = True) -> dict:
    return EmbedStage(cfg, use_ray=use_ray).run(force=force)
