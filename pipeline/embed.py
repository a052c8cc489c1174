"""embed: the teacher's view of every pair, computed once. Ray Data reads the download shards, tasks decode
and resize the images, a `map_batches` actor pool (the model loads once per actor) embeds images and EN/ZH
captions, and the driver writes one parquet per shard (schema.embed_schema) as soon as all of that shard's
rows are back."""
from __future__ import annotations

import hashlib
import json
import threading
import warnings
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cidistill.core.config import Config, TeacherConfig
from cidistill.core.errors import StageError
from cidistill.core.images import decode_rgb, read_tar_images
from cidistill.core.progress import Progress
from cidistill.core.runtime import embed_precision, require_resources, torch_threads
from cidistill.core.models import autocast, channels_last, check_model, configs_of, create, val_preprocess_cfg
from cidistill.core.text_ops import encode_text
from cidistill.core.schema import embed_schema, shard_stats_name
from cidistill.core.stage import Stage
from cidistill.core.store import Store


def _read_shard(row: dict) -> list[dict]:
    """One download shard -> rows of (shard, key, image bytes, captions). Runs as a Ray Data task."""
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


_TRANSFORMS: dict[str, tuple] = {}


def val_transform(pp: dict) -> tuple:
    """open_clip's evaluation transform for a preprocess config (kd.models.val_preprocess_cfg), split where it
    turns the PIL image into a tensor: (PIL part, mean, std, uint8 pixel shape, its steps). The PIL part (resize,
    crop) runs in Ray Data tasks on any core and ships uint8 pixels, 4x smaller than float; ToTensor and
    Normalize run on the model's device (pixels_to_input)."""
    key = json.dumps(pp, sort_keys=True)
    if key not in _TRANSFORMS:
        from cidistill.core.runtime import import_open_clip

        import_open_clip()  # torchvision's op fix first: this runs in fresh Ray workers too
        from open_clip.transform import PreprocessCfg, image_transform_v2
        from PIL import Image
        from torchvision.transforms import Compose

        whole = image_transform_v2(PreprocessCfg(**pp), is_train=False)
        steps = list(getattr(whole, "transforms", []))
        if [type(t).__name__ for t in steps[-2:]] not in (["ToTensor", "Normalize"], ["MaybeToTensor", "Normalize"]):
            raise StageError(f"embed expects open_clip's transform to end in ToTensor + Normalize, got {whole!r}")
        pil_part = Compose(steps[:-2])
        shape = np.asarray(pil_part(Image.new("RGB", (17, 13)))).shape
        _TRANSFORMS[key] = (pil_part, tuple(steps[-1].mean), tuple(steps[-1].std), shape, _steps(whole))
    return _TRANSFORMS[key]


def _steps(transform) -> list:
    """A transform's steps and their settings (lists read as tuples), to compare two transforms."""
    return [(type(t).__name__, {k: tuple(v) if isinstance(v, list) else v for k, v in vars(t).items()
                                if not k.startswith("_")}) for t in getattr(transform, "transforms", [transform])]


def decode_batch(batch: dict, pp: dict) -> dict:
    """Ray Data task: decode, hash and preprocess a batch's images (CPU work spread over the cluster's cores,
    not the model's actor). Replaces `image` with `ok`, `error`, `image_hash` and `pixels`; a corrupt image is
    counted (ok False, its error kept), never fatal."""
    from PIL import Image

    pil_part, _, _, shape, _ = val_transform(pp)
    out = {k: v for k, v in batch.items() if k != "image"}
    n = len(batch["image"])
    ok, hashes, errors = np.zeros(n, bool), np.full(n, "", object), np.full(n, "", object)
    pixels = np.zeros((n, *shape), np.uint8)
    for i, b in enumerate(batch["image"]):
        try:
            arr = decode_rgb(b, 0)
            pixels[i] = np.asarray(pil_part(Image.fromarray(arr)), dtype=np.uint8)
            hashes[i], ok[i] = hashlib.sha256(arr.tobytes()).hexdigest(), True
        except Exception as e:  # corrupt image: counted, not fatal
            errors[i] = f"undecodable: {type(e).__name__}"
    out.update(ok=ok, image_hash=hashes, error=errors, pixels=pixels)
    return out


class TeacherEmbedder:
    """Loads the teacher once; embeds decoded batches (decode_batch). Also usable in-process (tests, eval) via
    `embed`, which decodes too."""

    def __init__(self, teacher: dict, pp: dict | None = None, threads: int = 0):
        import torch

        tc = TeacherConfig(**teacher)
        if threads:  # an actor's own process; in-process callers scope it with torch_threads
            torch.set_num_threads(threads)
        self.device = "cuda" if tc.gpus_per_actor and torch.cuda.is_available() else "cpu"
        self.lm = create(tc.model, tc.pretrained, tc.model_config, device=self.device)
        channels_last(self.lm.model).eval()
        self.pp = pp or dict(self.lm.preprocess_cfg)
        _, mean, std, _, want = val_transform(self.pp)
        if want != _steps(self.lm.preprocess_val):  # decode tasks built theirs from configs: must be the model's
            raise StageError(f"decode tasks would preprocess as {want}, the teacher as {self.lm.preprocess_val!r}")
        self.mean, self.std = (torch.tensor(v, device=self.device).view(1, -1, 1, 1) for v in (mean, std))
        self.precision = embed_precision(tc.precision, self.device)
        self._model_lock = threading.Lock()  # two calls in flight: one prepares while the other runs the model

    def prepare(self, batch: dict) -> dict:
        """Tokenise (CPU work that runs beside the previous batch's forward)."""
        prep = {k: batch[k] for k in ("ok", "image_hash", "error", "pixels")}
        prep["tokens"] = {}
        for col, name in (("text_emb", "caption"), ("text_emb_zh", "caption_zh")):
            texts = [str(t) for t in batch[name]]
            idx = [i for i, t in enumerate(texts) if t.strip()]
            # a caption repeated in the batch (web alt-text repeats; the demo's styles share theirs) runs once
            uniq, inv = np.unique(np.array([texts[i] for i in idx], dtype=object), return_inverse=True)
            prep["tokens"][col] = (idx, inv, self.lm.tokenizer(uniq.tolist()) if idx else None)
        return prep

    def pixels_to_input(self, pixels: np.ndarray):
        """uint8 (N, H, W, 3) -> the model's input on its device: ToTensor + Normalize, the same arithmetic."""
        import torch

        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        return x.permute(0, 3, 1, 2).contiguous().float().div_(255).sub_(self.mean).div_(self.std)

    def forward(self, prep: dict) -> dict:
        import torch
        import torch.nn.functional as F

        ok = np.asarray(prep["ok"], bool)
        n, dim = len(ok), self.lm.embed_dim
        out = {k: prep[k] for k in ("ok", "image_hash", "error")}
        with self._model_lock, torch.no_grad(), autocast(self.precision, self.device):
            img = np.zeros((n, dim), np.float32)
            if ok.any():
                x = self.pixels_to_input(prep["pixels"][ok])
                img[ok] = F.normalize(self.lm.model.encode_image(x).float(), dim=-1).cpu().numpy()
            out["image_emb"] = img
            for col, (idx, inv, tok) in prep["tokens"].items():
                emb = np.full((n, dim), np.nan, np.float32)
                if idx:
                    uniq = F.normalize(encode_text(self.lm.model, tok.to(self.device)).float(), dim=-1).cpu().numpy()
                    emb[idx] = uniq[inv]
                out[col] = emb
        return out

    def decoded(self, images: list[bytes], captions: list[str], captions_zh: list[str]) -> dict:
        return decode_batch({"image": images, "caption": captions, "caption_zh": captions_zh}, self.pp)

    def embed(self, images: list[bytes], captions: list[str], captions_zh: list[str]) -> dict:
        return self.forward(self.prepare(self.decoded(images, captions, captions_zh)))

    def __call__(self, batch: dict) -> dict:
        res = self.forward(self.prepare(batch))
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
    name = "embed"
    inputs = ("download",)
    shard_input = ("download", "tar")
    reads = ("teacher",)

    def __init__(self, cfg: Config, use_ray: bool = True):
        super().__init__(cfg, use_ray)
        self.src = self.input_store("download")

    def units(self) -> list[str]:
        return self.input_shards()

    def check_config(self) -> None:
        """The teacher, before any stage of the run works and before a changed config clears the last
        embeddings: a wrong name, tag or checkpoint fails in one line, not in every Ray actor after they are gone."""
        tc = self.cfg.teacher
        if not tc.pretrained:
            raise StageError("teacher.pretrained is empty: the teacher would embed with random weights. Give an "
                             "open_clip tag, a checkpoint file or local-dir:PATH (or `random` on purpose)")
        check_model(tc.model, tc.pretrained, tc.model_config, "teacher")

    def _expected(self, shard: str) -> int:
        t = self.src.read_table(f"{shard}.parquet", columns=["status"])
        return int(pc.sum(pc.equal(t.column("status"), "success")).as_py() or 0)

    def run_units(self, pending: list[str]) -> dict[str, str]:
        expected = {s: self._expected(s) for s in pending}
        buffers: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
        errors: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        seen: dict[str, int] = defaultdict(int)
        tc = self.cfg.teacher
        dim = int(configs_of(tc.model, tc.pretrained, tc.model_config)[0]["embed_dim"])
        for s in [s for s in pending if expected[s] == 0]:  # a shard that downloaded nothing: an empty table
            self._write(s, {}, {}, dim)
        work = [s for s in pending if expected[s] > 0]
        if not work:
            return {}
        bar = Progress(sum(expected[s] for s in work), "embed", unit="img")
        for batch in self._batches(work):
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
        missing = {s: f"{seen[s]}/{expected[s]} rows came back" for s in work if not self.unit_done(s)}
        return missing

    def _batches(self, shards: list[str]):
        tc = self.cfg.teacher
        pp = val_preprocess_cfg(tc.model, tc.pretrained, tc.model_config)
        kwargs = {"teacher": vars(tc), "pp": pp}
        threads = max(1, int(tc.threads or tc.cpus_per_actor))
        if not self.use_ray:
            with torch_threads(threads):
                emb = TeacherEmbedder(**kwargs)
                for s in shards:
                    rows = _read_shard({"shard": s, "folder": self.src.uri})
                    for i in range(0, len(rows), tc.batch_size):
                        part = rows[i:i + tc.batch_size]
                        yield emb(decode_batch({k: [r[k] for r in part] for k in part[0]}, pp))
            return
        kwargs["threads"] = threads
        import ray

        ds = ray.data.from_items([{"shard": s, "folder": self.src.uri} for s in shards], override_num_blocks=len(shards))
        # read and decode are tasks on whatever cores the actors leave free (a GPU actor then never waits on
        # one process's decoding); actors take cpus_per_actor each, and a pool on every core hangs the reads
        ds = ds.flat_map(_read_shard).map_batches(decode_batch, fn_kwargs={"pp": pp}, batch_size=tc.batch_size,
                                                  batch_format="numpy")
        # two calls per actor at once: batch N+1 is tokenised (and copied to the device) while batch N is in
        # the model (TeacherEmbedder.forward holds a lock, so one forward at a time and torch keeps its threads)
        require_resources({"CPU": tc.cpus_per_actor, "GPU": tc.gpus_per_actor}, tc.num_actors,
                          f"teacher.num_actors={tc.num_actors} × (teacher.cpus_per_actor={tc.cpus_per_actor:g}"
                          + (f", teacher.gpus_per_actor={tc.gpus_per_actor:g})" if tc.gpus_per_actor else ")"),
                          spare_cpu=1.0)  # the read and decode tasks
        pool = ray.data.ActorPoolStrategy(size=tc.num_actors, max_concurrent_calls_per_actor=2,
                                          enable_true_multi_threading=True)
        # Ray Data restarts an actor whose node is lost. On one node (the demo, tests) restarts are off: there
        # they only print Ray's error line about the constructor's args (ray#53727); a lost actor fails the stage,
        # and its rerun resumes at the first unwritten shard. Ray 2.60 takes max_restarts only in its deprecated
        # ray_remote_args, and says so in a warning
        restarts = {} if sum(n["Alive"] for n in ray.nodes()) > 1 else {"max_restarts": 0}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(TeacherEmbedder, fn_constructor_kwargs=kwargs, batch_size=tc.batch_size, compute=pool,
                                num_cpus=tc.cpus_per_actor, num_gpus=tc.gpus_per_actor or None, batch_format="numpy",
                                **restarts)
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")

    def _write(self, shard: str, rows: dict, errs: dict, dim: int) -> None:
        if rows:
            self.out.write_table(f"{shard}.parquet", _to_table(rows, dim))
        else:
            self.out.write_table(f"{shard}.parquet", embed_schema(dim).empty_table())
        self.out.write_json(shard_stats_name(shard), {"embedded": len(rows.get("key", [])), **dict(errs)})

    def finish(self, stats: dict) -> dict:
        stats["teacher"] = f"{self.cfg.teacher.model}:{self.cfg.teacher.pretrained}"
        return stats

    def summary(self, stats: dict) -> str:
        return (f"{stats.get('embedded', 0)} pairs embedded, {stats.get('undecodable', 0)} undecodable, "
                f"{stats.get('empty_caption', 0)} empty captions, {stats['shards_done']} shards")

