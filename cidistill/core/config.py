"""The one typed config of a run: its dataclasses, each field's default and comment (the documentation
`cidistill config` prints), the allowed words and ranges, and the checks across fields. Reading YAML and
overrides into them is cidistill/core/config_io.py.

Unknown keys and wrong types are errors that name the full key (`train.batch_size`)."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .config_io import ConfigError, from_dict, masked, merge, parse_overrides, read_config_file, to_yaml
from .store import join, redacted

STAGES = ("download", "embed", "balance", "cluster", "pack", "train", "eval", "export", "card")
# the loss terms a training phase may weigh (kd/losses.py implements each)
LOSS_NAMES = ("clip", "align", "instance", "feature_distill", "cluster")


@dataclass
class DataConfig:
    urls: str = ""                      # the URL list: a file (parquet; csv, tsv with a header row; jsonl; .gz), a folder of them or a glob (any fsspec URI)
    url_col: str = "url"                # column of the image URL
    caption_col: str = "caption"        # column of the English caption
    # column of the Chinese caption: carried when the URL list has it (a name other than the default must be there)
    caption_zh_col: str = "caption_zh"
    # further columns carried from the URL list into download/*.parquet and the packed samples' json
    # (metadata, the evaluation's class and probe labels, the data.holdout column)
    extra_cols: list[str] = field(default_factory=list)
    image_size: int = 64                # img2dataset resizes every image to this many pixels a side
    resize_mode: str = "border"         # img2dataset's resize_mode: border | keep_ratio | keep_ratio_largest | center_crop | no
    encode_format: str = "png"          # how images are stored in the shards: png | jpg | webp
    samples_per_shard: int = 1000       # URLs per shard: the unit of work and of resume from download to cluster
    thread_count: int = 16              # download threads per shard (img2dataset)
    timeout: int = 10                   # seconds a fetch waits for each reply from a server
    deadline: float = 60.0              # seconds one URL may take in all (a server that trickles bytes is cut)
    max_bytes: int = 32 << 20           # a response larger than this is refused (and counted), never held whole
    retries: int = 0                    # per-URL retries inside img2dataset
    shard_retries: int = 2              # Ray task retries per shard (a worker that died)
    # URLs that failed for a transient reason (refused, reset, timeout, DNS, 5xx) are fetched again (those
    # alone), up to this many attempts over all runs; after that their failures are final (failed_transient)
    transient_attempts: int = 3
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])  # URL schemes ever fetched
    # fetch from loopback, private and link-local addresses too (a URL list from the web may name a node's
    # metadata service, 169.254.169.254, or hosts inside the cluster's network); the demo serves on 127.0.0.1.
    # Changing it does not redo a finished download (the URLs it refused: `cidistill download --force`)
    allow_private_addresses: bool = False
    # a response header (X-Robots-Tag) with one of these opts the image out: it is not downloaded
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb limit
    max_caption_chars: int = 4000       # longer captions are cut (and counted); tokenizers keep far less
    # "column=value": matching pairs are the evaluation split, held out of balance, cluster and training
    # (the demo holds out one artist style: "vendor=twitter"); empty = holdout_fraction decides
    holdout: str = ""
    # without `holdout`: this fraction of pairs (chosen by a hash of the key and `seed`) is the evaluation
    # split; 0 = none (the evaluation then runs on training pairs, and says so)
    holdout_fraction: float = 0.1

    def extras(self) -> list[str]:
        """extra_cols apart from the URL, caption and Chinese caption columns (carried under their own names)."""
        return [c for c in self.extra_cols if c not in (self.url_col, self.caption_col, self.caption_zh_col)]


@dataclass
class TeacherConfig:
    model: str = "ViT-B-32"             # open_clip model name, or local-dir:PATH
    pretrained: str = ""                # open_clip tag, checkpoint file, local-dir:PATH, or `random` on purpose
    model_config: str = ""              # optional JSON file registering a custom model name
    batch_size: int = 256               # pairs per embedding batch
    num_actors: int = 1                 # Ray Data actors holding a teacher each
    cpus_per_actor: float = 1.0         # CPUs each actor takes (leave some for the decode tasks)
    gpus_per_actor: float = 0.0         # GPUs each actor takes (0: CPU)
    threads: int = 0                    # torch threads per actor; 0 = cpus_per_actor
    precision: str = "auto"             # auto (bf16 on GPU, else fp32) | fp32 | bf16 | fp16


@dataclass
class BalanceConfig:
    near_dup_cos: float = 0.98          # cosine at or above which an item is a near duplicate of an earlier one
    semantic_eps: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])  # ε values reported (the sweep)
    apply_eps: float = 0.05             # the ε applied: cosine > 1 - ε to an earlier item of its cluster is dropped
    keep: str = "hard"                  # hard | easy | random
    # image: near/semantic rules read the teacher image cosine (SemDeDup); joint: the mean of the image and
    # caption cosines, so lookalike images with different captions are not duplicates of each other
    semantic_on: str = "image"
    kmeans_k: int = 0                   # 0 = about sqrt(N)
    max_cluster_size: int = 20000       # clusters above are split (bounds memory)
    rows_per_task: int = 131072         # rows one task of the out-of-core steps holds (a hash range, a cluster group)
    cluster_cap: int = 0                # 0 = no cap
    seed: int = 0                       # k-means and random keep order
    gpu: bool = False                   # FAISS on the GPU (the `gpu` extra)


@dataclass
class ClusterConfig:
    k: int = 200                        # pseudo-label clusters (CLIP-CID: 10^6 on LAION-400M)
    joint: bool = False                 # image+text embedding (UNICOM)
    niter: int = 20                     # k-means iterations
    max_points_per_centroid: int = 256  # k-means trains on at most k times this many points
    two_level_above: int = 4096         # k above this trains with two-level k-means
    min_cluster_size: int = 2           # clusters smaller than this are reported as tiny
    use_balanced: bool = True           # False: cluster the duplicates too (every non-held-out sample; ablation d)
    seed: int = 0                       # k-means seed
    gpu: bool = False                   # FAISS on the GPU (the `gpu` extra)


@dataclass
class PackConfig:
    # pairs per output shard (about: rows go to shards by a seeded hash, so sizes vary by ~sqrt of this)
    samples_per_shard: int = 1000
    seed: int = 0                       # the global shuffle: a pair's shard and place are a hash of (seed, key)


@dataclass
class StudentConfig:
    model: str = "cid-tiny-rn"          # open_clip model name (or one of cidistill's packaged configs)
    model_config: str = ""              # optional JSON file registering a custom model name
    pretrained: str = ""                # start from these weights (file / local-dir:)
    context_length: int = 64            # text tokens per caption
    trim_vocab: bool = True             # keep only the token rows the corpus uses (expanded back on export)
    text_from_teacher: int = 0          # >0: text tower = this many of the teacher's HF text layers (kd/text_tower.py)
    text_lr_scale: float = 0.2          # lr factor for those pretrained layers (the new vocab rows get the full lr)
    text_init: str = "teacher"          # teacher: start from those layers' weights | random: same shape, no weights
    text_vocab_common: int = 3000       # + the teacher's most frequent words beyond the corpus (prompts, queries)


@dataclass
class PhaseConfig:
    steps: int = 100                    # optimiser steps in this phase
    # loss name -> weight: clip, align, instance, feature_distill, cluster (kd/losses.py)
    losses: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})


@dataclass
class LossConfig:
    margin_s: float = 32.0              # cluster loss: logit scale s of the angular margin softmax
    margin_m: float = 0.3               # cluster loss: additive angular margin m (radians)
    partial_fc_r: float = 0.1           # cluster loss: fraction of negative centres sampled per step (PartialFC)
    learn_centres: bool = False         # cluster loss: train the k-means centres too
    instance_temperature: float = 0.05  # instance loss: temperature of the student-teacher contrastive term
    fd_weight: float = 1.0              # inside `instance`: feature distillation vs contrastive
    icl_weight: float = 1.0             # inside `instance`: weight of the interactive contrastive term


@dataclass
class TrainConfig:
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])  # run one after another
    batch_size: int = 128               # global batch (split over the workers)
    lr: float = 1e-3                    # peak learning rate of each phase (warm-up, then cosine)
    weight_decay: float = 0.1           # AdamW weight decay (not on biases and norms)
    warmup_steps: int = 20              # linear warm-up steps at the start of each phase
    grad_clip: float = 1.0              # gradient norm clip; 0 = none
    precision: str = "auto"             # auto (bf16 where the device has it natively, else fp32) | bf16 | fp32 | fp16 (cuda)
    workers: int = 1                    # Ray Train workers (DDP); 1 = in this process
    cpus_per_worker: float = 1.0        # Ray Train resources per worker (GPU runs: one GPU each as well)
    use_gpu: bool = False               # train on CUDA (nccl between workers)
    ckpt_every: int = 100               # steps between checkpoints (a killed run resumes from the last)
    log_every: int = 10                 # steps between lines of train/log.jsonl
    seed: int = 0                       # batches, augmentations and PartialFC samples are functions of (seed, step)
    threads: int = 0                    # torch threads per worker; 0 = its CPUs (train.cpus_per_worker on Ray Train, all in this process)
    use_balanced: bool = True           # False: pack and train every embedded sample (ablation d)
    # the global batch is drawn from this many streams, each reading its own shards of the packed dataset: the
    # batch sequence is a function of (seed, streams), the same for any train.workers that divides it
    streams: int = 2
    shuffle_block: int = 1024           # each stream shuffles blocks of this many pairs (held raw, not decoded)
    # processes per worker that read, decode and augment (0: in the trainer); each takes whole streams, so a
    # worker runs at most as many as it has streams (the largest count dividing them)
    loader_workers: int = 2
    augment: bool = True                # random resized crop
    style_augment: bool = False         # + rotation, blur, colour jitter: generalise across artist styles
    loss: LossConfig = field(default_factory=LossConfig)  # settings of the loss terms


EVAL_TASKS = ("zeroshot", "linear_probe", "retrieval")
PROMPTS_EN = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "{}")
PROMPTS_ZH = ("一张{}的照片。", "{}的图片。", "一幅{}的图像。", "{}")


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: list(EVAL_TASKS))  # what to measure (a task that cannot run is reported as skipped)
    # zero-shot classification: each evaluation pair's class (a URL-list column carried with data.extra_cols)
    class_col: str = "label"
    class_name_col: str = ""            # the classes' English names; empty: the class column's values are the names
    class_name_zh_col: str = ""         # the classes' Chinese names (a class without one uses its English name); empty: no ZH zero-shot
    probe_col: str = ""                 # the linear probe's label column; empty: class_col
    # the prompt ensembles: a class's text features averaged over these ({} = the class name)
    templates_en: list[str] = field(default_factory=lambda: list(PROMPTS_EN))
    templates_zh: list[str] = field(default_factory=lambda: list(PROMPTS_ZH))  # the same for the Chinese names
    batch_size: int = 256               # images per feature batch
    probe_max_iter: int = 300           # L-BFGS iterations of the linear probe
    throughput_batch: int = 128         # image throughput: random images per timed batch
    throughput_reps: int = 5            # timed batches after a warm-up; the fastest one counts
    precision: str = "fp32"             # forward passes: fp32 | bf16 | auto (bf16 on GPU or a CPU with native bf16, else fp32)


@dataclass
class ExportConfig:
    onnx: bool = False                  # also write image_encoder.onnx and text_encoder.onnx (the `onnx` extra)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# the settings that take one of a few words, checked before any work
CHOICES = {
    "data.resize_mode": ("border", "keep_ratio", "keep_ratio_largest", "center_crop", "no"),  # img2dataset's
    "data.encode_format": ("png", "jpg", "webp"),
    "teacher.precision": PRECISIONS,
    "balance.keep": ("hard", "easy", "random"),
    "balance.semantic_on": ("image", "joint"),
    "student.text_init": ("teacher", "random"),
    "train.precision": PRECISIONS,
    "eval.precision": PRECISIONS,
}

# the numeric settings' ranges (rule -> keys), checked before any work
RANGES = {
    ">= 1": "data.image_size data.samples_per_shard data.thread_count data.max_bytes data.transient_attempts "
            "data.max_image_pixels data.max_caption_chars teacher.batch_size teacher.num_actors "
            "balance.max_cluster_size balance.rows_per_task cluster.k cluster.niter cluster.max_points_per_centroid "
            "cluster.two_level_above pack.samples_per_shard student.context_length train.batch_size train.ckpt_every "
            "train.log_every train.shuffle_block eval.batch_size eval.probe_max_iter eval.throughput_batch "
            "eval.throughput_reps",
    "> 0": "data.timeout data.deadline train.lr train.loss.margin_s train.loss.instance_temperature",
    ">= 0": "data.retries data.shard_retries teacher.cpus_per_actor teacher.gpus_per_actor teacher.threads "
            "train.cpus_per_worker balance.kmeans_k "
            "balance.cluster_cap cluster.min_cluster_size student.text_from_teacher student.text_lr_scale "
            "student.text_vocab_common train.weight_decay train.warmup_steps train.grad_clip train.threads "
            "train.loader_workers train.loss.margin_m train.loss.fd_weight train.loss.icl_weight",
    "in [0, 1]": "balance.apply_eps",
    "in [-1, 1]": "balance.near_dup_cos",
    "in [0, 2147483647]": "seed balance.seed cluster.seed pack.seed train.seed",  # faiss takes a C int
}


def _in_range(rule: str, v: float) -> bool:
    op, _, bound = rule.partition(" ")
    if op == "in":
        lo, hi = (float(b) for b in bound.strip("[]").split(","))
        return lo <= v <= hi
    return v >= float(bound) if op == ">=" else v > float(bound)


@dataclass
class Config:
    workdir: str = "runs/demo"          # the work folder: a local path or any fsspec URI (s3://, gs://)
    dirs: dict[str, str] = field(default_factory=dict)     # stage -> folder, default WORKDIR/<stage>
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # what `cidistill run` runs, in order
    ray_address: str = ""               # join this Ray cluster; empty: RAY_ADDRESS, else a local one
    # fsspec options per protocol, e.g. {s3: {endpoint_url: "http://minio:9000"}}; keys and secrets are better
    # left to the environment, ~/.aws or the node's role. Never written to any output; masked when printed.
    storage_options: dict[str, dict] = field(default_factory=dict)
    seed: int = 0                       # the held-out fraction's hash seed
    data: DataConfig = field(default_factory=DataConfig)            # the URL list and the download
    teacher: TeacherConfig = field(default_factory=TeacherConfig)   # the teacher that embeds every pair
    balance: BalanceConfig = field(default_factory=BalanceConfig)   # image semantic balance (dedup)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)   # k-means pseudo-labels
    pack: PackConfig = field(default_factory=PackConfig)            # the curated dataset (webdataset shards)
    student: StudentConfig = field(default_factory=StudentConfig)   # the student model
    train: TrainConfig = field(default_factory=TrainConfig)         # the training schedule
    eval: EvalConfig = field(default_factory=EvalConfig)            # the evaluation
    export: ExportConfig = field(default_factory=ExportConfig)      # the exported folders

    def stage_dir(self, stage: str) -> str:
        if stage in self.dirs:
            return self.dirs[stage]
        return join(self.workdir, stage)

    def validate(self) -> "Config":
        self._validate_values()
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; known: {list(STAGES)}")
        bad = [s for s in self.dirs if s not in STAGES]
        if bad:
            raise ConfigError(f"dirs: unknown stage(s) {bad}")
        t = self.teacher
        if t.model.startswith("local-dir:") and t.pretrained not in ("", t.model):
            raise ConfigError(f"teacher.pretrained: {t.pretrained!r} would be ignored: teacher.model {t.model!r} holds "
                              "its own weights (leave teacher.pretrained empty)")
        if t.model.startswith("local-dir:"):
            t.pretrained = t.model  # every stage reads the teacher's weights from its folder
        if self.balance.apply_eps not in self.balance.semantic_eps:
            self.balance.semantic_eps = sorted(set(self.balance.semantic_eps) | {self.balance.apply_eps})
        if not 0.0 < self.train.loss.partial_fc_r <= 1.0:
            raise ConfigError("train.loss.partial_fc_r: must be in (0, 1]")
        if self.data.holdout and "=" not in self.data.holdout:
            raise ConfigError(f"data.holdout: expected COLUMN=VALUE, got {self.data.holdout!r}")
        if not 0.0 <= self.data.holdout_fraction < 1.0:
            raise ConfigError(f"data.holdout_fraction: must be in [0, 1), got {self.data.holdout_fraction}")
        if self.data.image_size ** 2 > self.data.max_image_pixels:  # every image is resized to it: a typo (22400)
            raise ConfigError(f"data.image_size: {self.data.image_size} px a side is {self.data.image_size ** 2:,} pixels an "
                              f"image, above data.max_image_pixels ({self.data.max_image_pixels:,})")
        self._validate_streams()
        self._validate_columns()
        if not self.train.phases:  # a train stage that could never train would still clear the last one's output
            raise ConfigError("train.phases: at least one phase (steps and losses) is needed")
        for i, ph in enumerate(self.train.phases):
            unknown = set(ph.losses) - set(LOSS_NAMES)
            if unknown:
                raise ConfigError(f"train.phases[{i}].losses: unknown loss(es) {sorted(unknown)}; known: {LOSS_NAMES}")
            if not any(w > 0 for w in ph.losses.values()):
                raise ConfigError(f"train.phases[{i}].losses: no loss with a weight above 0 ({ph.losses or '{}'})")
        return self

    def _validate_values(self) -> None:
        """Every word setting one of its CHOICES, every numeric one inside its range (RANGES), before any work:
        a zero batch or a negative learning rate would otherwise fail deep inside a stage."""
        for key, known in CHOICES.items():
            value = functools.reduce(getattr, key.split("."), self)
            if value not in known:
                raise ConfigError(f"{key}: must be one of {', '.join(known)}, got {value!r}")
        values = [(key, rule, functools.reduce(getattr, key.split("."), self))
                  for rule, keys in RANGES.items() for key in keys.split()]
        values += [(f"train.phases.{i}.steps", ">= 1", ph.steps) for i, ph in enumerate(self.train.phases)]
        values += [(f"train.phases.{i}.losses.{k}", ">= 0", w) for i, ph in enumerate(self.train.phases)
                   for k, w in ph.losses.items()]
        values += [(f"balance.semantic_eps.{i}", "in [0, 1]", e) for i, e in enumerate(self.balance.semantic_eps)]
        for key, rule, v in values:
            if not math.isfinite(v):  # YAML's .inf passes every lower bound; lr .inf trains NaN
                raise ConfigError(f"{key}: must be a finite number, got {v!r}")
            if not _in_range(rule, v):
                raise ConfigError(f"{key}: must be {rule}, got {v!r}")

    def _validate_columns(self) -> None:
        from .schema import reserved_columns

        d, e = self.data, self.eval
        extra = d.extras()
        twice = sorted({c for c in extra if extra.count(c) > 1})
        if twice:
            raise ConfigError(f"data.extra_cols: {twice} listed twice")
        clash = sorted(set(extra) & reserved_columns())
        if clash:
            raise ConfigError(f"data.extra_cols: {clash} would clash with columns the stages write themselves; "
                              "rename them in the URL list")
        col = d.holdout.partition("=")[0]
        if col and col not in extra:
            raise ConfigError(f"data.holdout: its column {col!r} must be carried: add it to data.extra_cols")
        unknown = sorted(set(e.tasks) - set(EVAL_TASKS))
        if unknown:
            raise ConfigError(f"eval.tasks: unknown task(s) {unknown}; known: {list(EVAL_TASKS)}")
        for key, temps in (("eval.templates_en", e.templates_en), ("eval.templates_zh", e.templates_zh)):
            bad = [t for t in temps if not _one_class_slot(t)]
            if not temps or bad:
                raise ConfigError(f"{key}: each template needs one {{}} for the class name (a literal brace is "
                                  f"written twice, {{{{ or }}}}), got {bad or temps}")

    def _validate_streams(self) -> None:
        t = self.train
        if t.streams < 1 or t.workers < 1 or t.streams % t.workers:
            raise ConfigError(f"train.streams ({t.streams}) must be a multiple of train.workers ({t.workers})")
        if t.batch_size % t.streams:
            raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.streams ({t.streams})")


def _one_class_slot(template: str) -> bool:
    """A prompt the evaluation can fill: str.format puts the class name in (`{x}`, a lone `{`, two `{}` failed
    the evaluation after the whole training; `{{}}` left the name out)."""
    try:
        return "\0" not in template and "\0" in template.format("\0")
    except (IndexError, KeyError, ValueError, AttributeError):
        return False


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def public_dict(cfg) -> dict:
    """The config as a mapping that outputs (the data card) may record: no storage secret, no URI's password,
    signature or token."""
    return redacted(dict(dataclasses.asdict(cfg), storage_options=masked(cfg.storage_options)))


def flat_fields(cfg, sections: tuple[str, ...]) -> dict[str, Any]:
    """The config's leaves under each dotted name in `sections` ("balance", "data.holdout"), as
    {"balance.apply_eps": 0.05, ...}; lists and mappings (train.phases) are one JSON value each. A URI's secrets
    are left out (a presigned URL signed again is the same input), as everywhere the fields are recorded."""
    out: dict[str, Any] = {}

    def walk(obj, key: str):
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
        else:
            out[key] = redacted(json.loads(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj,
                                                      default=lambda o: dataclasses.asdict(o))))

    for sec in sections:
        node = cfg
        for part in sec.split("."):
            node = getattr(node, part)
        walk(node, sec)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    """The config of a run: the defaults, then `base`, the YAML file and the `key=value` overrides, each
    merged over the last; checked (types, then values) before any work."""
    data = merge(dict(base or {}), read_config_file(path)) if path else dict(base or {})
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(Config, data).validate()


def config_yaml(cfg: Config, unicode: bool = True) -> str:
    """The whole config as YAML, every field preceded by its comment (secrets masked); `load_config` reads it back."""
    return to_yaml(cfg, unicode)
