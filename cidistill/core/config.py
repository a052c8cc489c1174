"""The one typed config of a run: dataclasses, YAML load, `key=value` overrides, validation.

Unknown keys and wrong types are errors that name the full key (`train.batch_size`)."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .store import join

STAGES = ("download", "embed", "balance", "cluster", "train", "eval", "export", "card")
# the loss terms a training phase may weigh (kd/losses.py implements each)
LOSS_NAMES = ("clip", "align", "instance", "feature_distill", "cluster")


class ConfigError(ValueError):
    pass


@dataclass
class DataConfig:
    urls: str = ""                      # parquet file / folder / glob with url + caption columns
    url_col: str = "url"
    caption_col: str = "caption"
    caption_zh_col: str = "caption_zh"
    extra_cols: list[str] = field(default_factory=lambda: ["caption_zh", "emoji", "group", "subgroup", "vendor"])
    image_size: int = 64
    resize_mode: str = "border"
    encode_format: str = "png"
    samples_per_shard: int = 1000
    thread_count: int = 16
    timeout: int = 10
    retries: int = 0                    # per-URL retries inside img2dataset
    shard_retries: int = 2              # Ray task retries per shard
    allowed_schemes: list[str] = field(default_factory=lambda: ["http", "https"])
    disallowed_header_directives: list[str] = field(default_factory=lambda: ["noai", "noimageai"])
    max_image_pixels: int = 89_478_485  # PIL's decompression-bomb limit
    max_caption_chars: int = 4000       # longer captions are cut (and counted); tokenizers keep far less
    # "column=value": matching pairs are the evaluation split, held out of balance, cluster and training
    # (the demo holds out one artist style: "vendor=twitter"); empty = no held-out split
    holdout: str = ""


@dataclass
class TeacherConfig:
    model: str = "ViT-B-32"
    pretrained: str = ""                # open_clip tag, checkpoint file, or local-dir:PATH
    model_config: str = ""              # optional JSON file registering a custom model name
    batch_size: int = 256
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads: int = 0                    # torch threads per actor; 0 = cpus_per_actor
    precision: str = "auto"             # auto | fp32 | bf16 | fp16


@dataclass
class BalanceConfig:
    near_dup_cos: float = 0.98
    semantic_eps: list[float] = field(default_factory=lambda: [0.02, 0.05, 0.1])
    apply_eps: float = 0.05
    keep: str = "hard"                  # hard | easy | random
    # image: near/semantic rules read the teacher image cosine (SemDeDup); joint: the mean of the image and
    # caption cosines, so lookalike images with different captions are not duplicates of each other
    semantic_on: str = "image"
    kmeans_k: int = 0                   # 0 = about sqrt(N)
    max_cluster_size: int = 20000       # clusters above are split (bounds memory)
    cluster_cap: int = 0                # 0 = no cap
    seed: int = 0
    gpu: bool = False


@dataclass
class ClusterConfig:
    k: int = 200
    joint: bool = False                 # image+text embedding (UNICOM)
    niter: int = 20
    max_points_per_centroid: int = 256
    two_level_above: int = 4096         # k above this trains with two-level k-means
    min_cluster_size: int = 2           # clusters smaller than this are reported as tiny
    use_balanced: bool = True           # False: cluster the duplicates too (every non-held-out sample; ablation d)
    seed: int = 0
    gpu: bool = False


@dataclass
class StudentConfig:
    model: str = "cid-tiny-rn"
    model_config: str = ""
    pretrained: str = ""                # start from these weights (file / local-dir:)
    context_length: int = 64
    trim_vocab: bool = True
    text_from_teacher: int = 0          # >0: text tower = this many of the teacher's HF text layers (kd/text_tower.py)
    text_lr_scale: float = 0.2          # lr factor for those pretrained layers (the new vocab rows get the full lr)
    text_init: str = "teacher"          # teacher: start from those layers' weights | random: same shape, no weights
    text_vocab_common: int = 3000       # + the teacher's most frequent words beyond the corpus (prompts, queries)


@dataclass
class PhaseConfig:
    steps: int = 100
    losses: dict[str, float] = field(default_factory=lambda: {"clip": 1.0})


@dataclass
class LossConfig:
    margin_s: float = 32.0
    margin_m: float = 0.3
    partial_fc_r: float = 0.1
    learn_centres: bool = False
    instance_temperature: float = 0.05
    fd_weight: float = 1.0              # inside `instance`: feature distillation vs contrastive
    icl_weight: float = 1.0


@dataclass
class TrainConfig:
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 20
    grad_clip: float = 1.0
    precision: str = "auto"             # auto (bf16 where the device has it natively, else fp32) | bf16 | fp32 | fp16 (cuda)
    workers: int = 1
    cpus_per_worker: float = 1.0        # Ray Train resources per worker (GPU runs: one GPU each as well)
    use_gpu: bool = False
    ckpt_every: int = 100
    log_every: int = 10
    seed: int = 0
    threads: int = 0                    # torch threads per worker; 0 = all
    use_balanced: bool = True           # False: train on every embedded sample (ablation d)
    augment: bool = True                # random resized crop
    style_augment: bool = False         # + rotation, blur, colour jitter: generalise across artist styles
    loss: LossConfig = field(default_factory=LossConfig)


@dataclass
class EvalConfig:
    tasks: list[str] = field(default_factory=lambda: ["zeroshot", "linear_probe", "retrieval"])
    batch_size: int = 256
    probe_max_iter: int = 300
    bootstrap: int = 1000


@dataclass
class ExportConfig:
    onnx: bool = False


@dataclass
class Config:
    workdir: str = "runs/demo"
    dirs: dict[str, str] = field(default_factory=dict)     # stage -> folder, default WORKDIR/<stage>
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    ray_address: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    balance: BalanceConfig = field(default_factory=BalanceConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    def stage_dir(self, stage: str) -> str:
        if stage in self.dirs:
            return self.dirs[stage]
        return join(self.workdir, stage)

    def validate(self) -> "Config":
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown stage(s) {bad}; known: {list(STAGES)}")
        bad = [s for s in self.dirs if s not in STAGES]
        if bad:
            raise ConfigError(f"dirs: unknown stage(s) {bad}")
        if self.balance.keep not in ("hard", "easy", "random"):
            raise ConfigError(f"balance.keep: must be hard, easy or random, got {self.balance.keep!r}")
        if self.balance.semantic_on not in ("image", "joint"):
            raise ConfigError(f"balance.semantic_on: must be image or joint, got {self.balance.semantic_on!r}")
        if self.balance.apply_eps not in self.balance.semantic_eps:
            self.balance.semantic_eps = sorted(set(self.balance.semantic_eps) | {self.balance.apply_eps})
        if self.student.text_init not in ("teacher", "random"):
            raise ConfigError(f"student.text_init: must be teacher or random, got {self.student.text_init!r}")
        if self.student.text_from_teacher < 0:
            raise ConfigError("student.text_from_teacher: must be >= 0 (0 = the student's own text tower)")
        if not 0.0 < self.train.loss.partial_fc_r <= 1.0:
            raise ConfigError("train.loss.partial_fc_r: must be in (0, 1]")
        for key, p in (("teacher.precision", self.teacher.precision), ("train.precision", self.train.precision)):
            if p not in ("auto", "fp32", "bf16", "fp16"):
                raise ConfigError(f"{key}: must be auto, fp32, bf16 or fp16, got {p!r}")
        if self.data.holdout and "=" not in self.data.holdout:
            raise ConfigError(f"data.holdout: expected COLUMN=VALUE, got {self.data.holdout!r}")
        if self.cluster.k < 1:
            raise ConfigError("cluster.k: must be >= 1")
        for i, ph in enumerate(self.train.phases):
            unknown = set(ph.losses) - set(LOSS_NAMES)
            if unknown:
                raise ConfigError(f"train.phases[{i}].losses: unknown loss(es) {sorted(unknown)}; known: {LOSS_NAMES}")
        return self


# ---------------------------------------------------------------- building dataclasses from dicts
def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {_check(kt, k, f"{key}.{k}"): _check(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + k for k in sorted(unknown))}")
    kwargs = {k: _check(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def flat_fields(cfg, sections: tuple[str, ...]) -> dict[str, Any]:
    """The config's leaves under each dotted name in `sections` ("balance", "data.holdout"), as
    {"balance.apply_eps": 0.05, ...}; lists and mappings (train.phases) are one JSON value each."""
    out: dict[str, Any] = {}

    def walk(obj, key: str):
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                walk(getattr(obj, f.name), f"{key}.{f.name}" if key else f.name)
        else:
            out[key] = json.loads(json.dumps(dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj,
                                             default=lambda o: dataclasses.asdict(o)))

    for sec in sections:
        node = cfg
        for part in sec.split("."):
            node = getattr(node, part)
        walk(node, sec)
    return out


def merge(base: dict, over: dict, prefix: str = "") -> dict:
    """`over` wins key by key; a list is indexed by number (`train.phases.1.steps=450`)."""
    def one(old, new, key: str):
        return merge(old, new, f"{key}.") if isinstance(new, dict) and isinstance(old, dict) else new

    out = dict(base)
    for k, v in over.items():
        old, key = out.get(k), f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(old, list) and v and all(str(i).isdigit() for i in v):
            old = list(old)
            for i, item in v.items():
                if int(i) >= len(old):
                    raise ConfigError(f"{key}.{i}: the list has {len(old)} item(s)")
                old[int(i)] = one(old[int(i)], item, f"{key}.{i}")
            out[k] = old
        else:
            out[k] = one(old, v, key)
    return out


def parse_overrides(pairs: list[str]) -> dict:
    """`train.batch_size=64 balance.semantic_eps=[0.05,0.1]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"override {p!r}: expected key=value")
        k, v = p.split("=", 1)
        node = out
        parts = k.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(v)
    return out


def load_config(path: str | None = None, overrides: list[str] | None = None, base: dict | None = None) -> Config:
    data: dict = dict(base or {})
    if path:
        text = Path(path).read_text()
        loaded = yaml.safe_load(text) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = merge(data, loaded)
    data = merge(data, parse_overrides(overrides or []))
    return from_dict(Config, data).validate()
