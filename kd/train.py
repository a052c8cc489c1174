"""The training loop: a student open_clip model learns from the teacher's precomputed embeddings (never the
teacher itself), the kept set and the k-means pseudo-labels, through a schedule of phases of weighted losses.

Read it top to bottom: `train_worker` sets a worker up (`setup`), resumes (`checkpoint.resume_checkpoint`), opens
the packed dataset's stream at that step (kd/stream.py), then loops `train_step` → `log_record` →
`save_checkpoint`. One worker runs in this process; more run under Ray Train's TorchTrainer (DDP: gloo on CPU,
nccl on GPU). Batches, augmentations and PartialFC samples are functions of (seed, streams, step), so resuming
from a mid-epoch checkpoint reaches the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from cidistill.core import faults
from cidistill.core.config import Config, from_dict
from cidistill.core.errors import StageError, raise_if_stopped
from cidistill.core.runtime import cache_dir, require_resources, torch_threads
from cidistill.core.progress import Progress
from cidistill.core.packed import iter_tar_samples, sample_fields
from cidistill.core.models import autocast, channels_last, count_params, create
from cidistill.core.text_ops import by_length, encode_text, trim_vocab
from cidistill.core.store import Store, absolute
from .checkpoint import clean_partial, latest_checkpoint, read_log, resume_checkpoint, save_checkpoint, write_log
from .data import manifest_texts
from .losses import DistillHeads, compute_losses
from .stream import BackendTokenizer, BatchMaker, StreamSpec, data_position, worker_batches
from .text_tower import student_with_teacher_text

TEACHER_LOSSES = ("instance", "feature_distill", "cluster")


class TrainingDiverged(StageError):
    pass


class TrainingFailed(StageError):
    pass


class TrainModule(nn.Module):
    """Student + heads as one module (what DDP wraps). With `lock_text` the student's Hugging Face text trunk is
    frozen and run without gradients: a LiT model trains only its projection on the text side."""

    def __init__(self, student: nn.Module, heads: DistillHeads, lock_text: bool = False):
        super().__init__()
        self.student, self.heads, self.lock_text = student, heads, lock_text
        self.locked: LockedText | None = None  # the locked trunk's features, computed before the first step

    def forward(self, images, tokens, tokens_zh, batch: dict, weights: dict, loss_cfg) -> dict:
        """Student embeddings, then the weighted loss terms: all inside forward, as DDP requires."""
        img = self.student.encode_image(images)
        if self.lock_text:
            feats = locked_text_features(self.student, tokens) if self.locked is None else self.locked(tokens)
            out = {"img": img, "txt": self.student.text.proj(feats)}
        else:
            out = {"img": img, "txt": encode_text(self.student, tokens)}
            if tokens_zh is not None:
                out["txt_zh"] = encode_text(self.student, tokens_zh)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            out, batch = gather_global(out), gather_global(batch)
        return compute_losses(weights, out, batch, self.heads, self.student.logit_scale, loss_cfg)


def gather_global(tensors: dict) -> dict:
    """Every rank sees the whole global batch, so contrastive negatives and PartialFC positives are those of
    one worker with the same global batch. Gradients flow back through the gather (summed over ranks), and
    DDP's average then gives exactly the single-worker gradient."""
    from torch.distributed.nn.functional import all_gather

    with warnings.catch_warnings():  # deprecated in torch 2.13 for a private API; it prints once per worker
        warnings.filterwarnings("ignore", "torch.distributed.nn.functional.all_gather is deprecated", FutureWarning)
        return {k: torch.cat(all_gather(v.contiguous()) if v.requires_grad else _gather_nograd(v))
                if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def _gather_nograd(v: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(v) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, v.contiguous())
    return parts


def lr_at(step_in_phase: int, phase_steps: int, base: float, warmup: int) -> float:
    warmup = min(warmup, max(1, phase_steps // 5))
    if step_in_phase < warmup:
        return base * (step_in_phase + 1) / warmup
    t = (step_in_phase - warmup) / max(1, phase_steps - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def phase_at(phases, step: int):
    start = 0
    for i, ph in enumerate(phases):
        if step < start + ph.steps:
            return i, ph, step - start
        start += ph.steps
    return len(phases) - 1, phases[-1], phases[-1].steps


@torch.no_grad()
def locked_text_features(model, tokens: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """The frozen trunk's pooled output (in eval mode: a locked tower has no dropout)."""
    text = model.text
    was = text.transformer.training
    text.transformer.eval()

    def pooled(x):
        mask = (x != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=x, attention_mask=mask), mask)

    try:
        return by_length(model, tokens, pooled, chunks=-(-len(tokens) // batch))
    finally:
        text.transformer.train(was)


class LockedText:
    """A locked trunk's features, computed once per distinct caption of the training split (in a fixed order
    and fixed chunks, so a resumed run has the same values) instead of for every batch: the demo teacher's
    350 steps see each of its 3,786 distinct captions ~12 times. Holds one row per distinct caption (5.8 MB
    there); a caption not among them is computed when it comes."""

    def __init__(self, model: nn.Module, texts, tokenize):
        rows = tokenize(sorted(set(texts)))
        self.model, self.feats = model, locked_text_features(model, rows)  # on the rows' device
        self.row = {r.tobytes(): i for i, r in enumerate(rows.cpu().numpy())}

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        idx = torch.tensor([self.row.get(r.tobytes(), -1) for r in tokens.cpu().numpy()], device=self.feats.device)
        out, miss = self.feats[idx.clamp(min=0)], idx < 0
        if miss.any():
            out[miss] = locked_text_features(self.model, tokens[miss]).to(out.dtype)
        return out


@dataclass
class Worker:
    """What one worker holds while it trains."""
    cfg: Config
    job: dict
    rank: int
    world: int
    device: torch.device
    out: Store                    # the train stage's folder (local or an object store)
    spec: StreamSpec              # the packed dataset's stream: fixes the batch sequence
    make: BatchMaker              # raw samples -> a step's tensors (in the loader processes)
    module: TrainModule
    model: nn.Module              # the module, DDP-wrapped when world > 1
    opt: torch.optim.Optimizer
    params: list
    student_name: str
    student_model_config: str


def worker_rank(job: dict) -> tuple[int, int]:
    if not job.get("distributed"):
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def packed_has_zh(spec: StreamSpec) -> bool:
    store = Store(spec.root)
    return any(store.read_json(name.removesuffix(".tar") + "_stats.json").get("has_zh") for name, _ in spec.shards)


def used_token_ids(tokenizer, texts, chunk: int = 4096) -> torch.Tensor:
    """The token ids a stream of texts uses, tokenised a chunk at a time."""
    used, buf = torch.empty(0, dtype=torch.long), []
    for t in texts:
        buf.append(t)
        if len(buf) == chunk:
            used, buf = torch.unique(torch.cat([used, tokenizer(buf).flatten()])), []
    return torch.unique(torch.cat([used, tokenizer(buf).flatten()])) if buf else used


def build_student(cfg: Config, job: dict, out: Store, spec: StreamSpec, publish: bool = True):
    """The student and what turns packed samples into its batches (its tokenizer, a vocabulary cut or trimmed
    to the corpus). The order of the steps is the order the random initialisations are drawn in: keep it."""
    sc, tc = cfg.student, cfg.train
    lock_text = bool(job.get("lock_text"))
    lm = create(sc.model, sc.pretrained, sc.model_config, context_length=None if lock_text else sc.context_length)
    use_zh = job.get("chinese", True) and not lock_text and packed_has_zh(spec)
    model_config = sc.model_config
    if sc.text_from_teacher and not lock_text:
        lm, model_config = student_with_teacher_text(cfg, lm, manifest_texts(spec.root, spec.split, use_zh), out, publish)
    old2new = None
    if lock_text:
        lm.model.lock_text_tower()
    elif sc.trim_vocab and not sc.text_from_teacher:  # a tower cut from the teacher has its corpus vocabulary
        old2new = trim_vocab(lm.model, used_token_ids(lm.tokenizer, manifest_texts(spec.root, spec.split, use_zh)))
    size = lm.model_cfg["vision_cfg"]["image_size"]
    make = BatchMaker(size if isinstance(size, int) else size[0], lm.preprocess_cfg.get("mean", (0.481, 0.458, 0.408)),
                      lm.preprocess_cfg.get("std", (0.269, 0.261, 0.276)), BackendTokenizer.of(lm.tokenizer), old2new, use_zh,
                      tc.augment, tc.style_augment, tc.seed)
    channels_last(lm.model)
    return lm, model_config, make


def make_optimizer(cfg: Config, module: TrainModule):
    """AdamW; pretrained text layers (a tower cut from the teacher) learn slower than what starts from scratch."""
    sc, tc = cfg.student, cfg.train
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    slow = {id(p) for n, p in named if sc.text_from_teacher and n.startswith("student.text.transformer.")
            and "word_embeddings" not in n}
    groups = []
    for scale, picked in ((1.0, [p for p in params if id(p) not in slow]),
                          (sc.text_lr_scale, [p for p in params if id(p) in slow])):
        groups += [{"params": [p for p in picked if p.ndim >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in picked if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(0.9, 0.98), eps=1e-6), params


def setup(job: dict) -> Worker:
    cfg = from_dict(Config, job["config"])
    rank, world = worker_rank(job)
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.train.seed)
    out = Store(job["out"])
    if rank == 0:
        clean_partial(out)
    spec = StreamSpec.of(job["data"], "train", cfg.train)
    lm, model_config, make = build_student(cfg, job, out, spec, publish=rank == 0)
    weights_any = {k for ph in cfg.train.phases for k, w in ph.losses.items() if w}
    centroids = None
    if "cluster" in weights_any:
        centroids = torch.from_numpy(Store(cfg.stage_dir("cluster")).read_npy("centroids.npy"))
    heads = DistillHeads(lm.embed_dim, teacher_width(spec) or lm.embed_dim, centroids, cfg.train.loss.learn_centres,
                         cfg.train.loss.instance_temperature)
    module = TrainModule(lm.model, heads, lock_text=bool(job.get("lock_text"))).to(device)
    if module.lock_text:
        with autocast(cfg.train.precision, device):
            module.locked = LockedText(module.student, manifest_texts(spec.root, spec.split, False),
                                       lambda t: make.tokens(t).to(device))
    opt, params = make_optimizer(cfg, module)
    return Worker(cfg, job, rank, world, device, out, spec, make, module, module, opt, params, lm.name, model_config)


def teacher_width(spec: StreamSpec) -> int | None:
    """The teacher embeddings' width, from the first packed sample (None: a pack without them)."""
    first = sample_fields(next(iter_tar_samples(Store(spec.root), spec.shards[0][0])))
    return first["t_img"].shape[0] if "t_img" in first else None


def train_step(w: Worker, step: int, phase, lr: float, item: dict) -> tuple[torch.Tensor, dict]:
    """One optimiser step on this worker's share of global batch `step` (`item`, from the stream)."""
    tc = w.cfg.train
    if item["step"] != step:
        raise RuntimeError(f"the data stream is at step {item['step']}, the trainer at {step}")
    for g in w.opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    batch = {k: item[k].to(w.device) for k in ("cluster_id", "t_img", "t_txt", "has_zh") if k in item}
    tokens_zh = item["tokens_zh"].to(w.device) if "tokens_zh" in item else None
    torch.manual_seed(tc.seed * 104729 + step)  # PartialFC's negative sample and any dropout
    with autocast(tc.precision, w.device):
        terms = w.model(item["x"].to(w.device), item["tokens"].to(w.device), tokens_zh, batch, phase.losses, tc.loss)
    loss = sum(terms.values())
    if not torch.isfinite(loss):
        good = latest_checkpoint(w.out)  # a name on the store
        raise TrainingDiverged(f"step {step}: loss is not finite ({ {k: float(v) for k, v in terms.items()} });"
                               f" last good checkpoint: {good or 'none'}")
    w.opt.zero_grad(set_to_none=True)
    loss.backward()
    if tc.grad_clip:
        torch.nn.utils.clip_grad_norm_(w.params, tc.grad_clip)
    w.opt.step()
    with torch.no_grad():
        w.module.student.logit_scale.clamp_(0, math.log(100))
    return loss.detach(), terms


def log_record(w: Worker, step: int, phase_index: int, loss: torch.Tensor, terms: dict, lr: float,
               seconds: float) -> dict:
    """The loss terms averaged over workers, with the step's learning rate and rate."""
    tc = w.cfg.train
    vals = {k: float(v.detach()) for k, v in terms.items()}
    loss_v = float(loss)
    if w.world > 1:
        t = torch.tensor([loss_v] + list(vals.values()))
        torch.distributed.all_reduce(t)
        t /= w.world
        loss_v, vals = float(t[0]), dict(zip(vals, t[1:].tolist()))
    return {"step": step, "phase": phase_index, "loss": loss_v, **vals, "lr": lr,
            "samples_per_s": tc.batch_size * tc.log_every / max(seconds, 1e-9)}


def train_worker(job: dict) -> dict:
    """Everything one worker does. `job` = {"config": dict, "out": folder}; rank/world from Ray Train."""
    w = setup(job)
    tc = w.cfg.train
    ckpt, step = resume_checkpoint(w.out, w.module, w.opt, say=print if w.rank == 0 else None)
    resumed_from = step
    if ckpt is not None and w.rank == 0:
        print(f"[train] resuming from {ckpt}")
    if w.world > 1:
        w.model = nn.parallel.DistributedDataParallel(w.module, find_unused_parameters=True)
    total = sum(ph.steps for ph in tc.phases)
    log = read_log(w.out, step) if w.rank == 0 else []  # rank 0's lines, written with each checkpoint
    bar = Progress(total, "train", unit="step", initial=step, disable=w.rank != 0)
    batches = worker_batches(w.spec, w.make, w.rank, w.world, step, tc.loader_workers)
    t_start, t_log, last, waited = time.time(), time.time(), {}, 0.0
    while step < total:
        pi, phase, sip = phase_at(tc.phases, step)
        lr = lr_at(sip, phase.steps, tc.lr, tc.warmup_steps)
        t_wait = time.perf_counter()
        item = next(batches)
        waited += time.perf_counter() - t_wait
        loss, terms = train_step(w, step, phase, lr, item)
        step += 1
        bar.update()
        faults.point()
        raise_if_stopped()
        if step % tc.log_every == 0 or step == total:
            last = log_record(w, step, pi, loss, terms, lr, time.time() - t_log)
            t_log = time.time()
            if w.rank == 0:
                log.append(json.dumps(last))
                bar.set_postfix(loss=f"{last['loss']:.3f}", phase=pi)
        if w.rank == 0 and (step % tc.ckpt_every == 0 or step == total):
            write_log(w.out, log)
            save_checkpoint(w.out, step, w.module, w.opt, {"data_position": data_position(w.spec, step)})
        if job.get("stop_after") and step >= job["stop_after"]:
            break
    bar.close()
    batches.close()  # stops the loader processes
    if w.rank == 0:
        write_log(w.out, log)
    result = worker_result(w, step, time.time() - t_start, last)
    result["resumed_from"] = resumed_from
    result["data"]["wait_seconds"] = round(waited, 3)  # time the steps waited for the loader
    return result


def worker_result(w: Worker, step: int, seconds: float, last: dict) -> dict:
    data = {"shards": len(w.spec.shards), "streams": w.spec.streams, "epochs": step * w.spec.batch_size / w.spec.pairs}
    result = {"steps": step, "seconds": seconds, "pairs": w.spec.pairs, "data": data,
              "student_params": count_params(w.module.student), "last": last, "workers": w.world,
              "student_model": w.student_name, "student_model_config": w.student_model_config}
    if w.world > 1:  # where each rank ran (shows the placement across nodes)
        import ray

        nodes = [None] * w.world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        result["worker_nodes"] = nodes
    return result


def require_workers(t) -> None:
    """Ray Train's workers fit in the cluster (it retried for ever otherwise, a page of tracebacks a minute)."""
    require_resources({"CPU": t.cpus_per_worker, "GPU": 1 if t.use_gpu else 0}, t.workers,
                      f"train.workers={t.workers} × (train.cpus_per_worker={t.cpus_per_worker:g}"
                      + (", a GPU each: train.use_gpu)" if t.use_gpu else ")"))


def train(cfg: Config, out_dir: str, *, data: str = "", use_ray: bool = True, lock_text: bool = False,
          chinese: bool = True, stop_after: int = 0) -> dict:
    """Train into out_dir (resuming from its last checkpoint) on the packed dataset in `data` (default: the
    pack stage's folder): in this process, or on Ray Train workers."""
    job = {"config": asdict(cfg), "out": absolute(out_dir), "lock_text": lock_text, "chinese": chinese,
           "stop_after": stop_after, "data": data or cfg.stage_dir("pack"), "cwd": os.getcwd()}
    if cfg.train.workers <= 1 or not use_ray:
        with torch_threads(cfg.train.threads):
            return train_worker(job)
    from ray.train import LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job["distributed"] = True
    require_workers(cfg.train)
    trainer = TorchTrainer(_ray_loop, train_loop_config=job,
                           scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                                        resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
                           torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
                           # Ray Train's own files (no checkpoints: ours go to the store) stay on this node
                           run_config=RunConfig(name="cidistill-train", storage_path=str(cache_dir() / "ray_train"),
                                                # its controller's INFO lines (resources, the worker group) say
                                                # nothing a user acts on; `cidistill -v` shows them
                                                logging_config=LoggingConfig(log_level="INFO" if os.environ.get(
                                                    "CIDISTILL_VERBOSE") == "1" else "WARNING")))
    try:
        trainer.fit()
    except Exception as e:  # a worker's error, or its node lost: say so in one line; the rerun resumes
        if isinstance(e, StageError):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raised = [ln for ln in lines if "Error: " in ln and not ln.startswith("File ")]  # the causes' lines
        cause = (raised or lines or [type(e).__name__])[-1]
        good = latest_checkpoint(Store(job["out"]))
        raise TrainingFailed(f"a training worker failed ({cause[:300]}); rerun to resume from "
                             f"{good or 'the start'}") from None
    return Store(job["out"]).read_json("_worker_result.json")


def _ray_loop(config: dict) -> None:
    import ray.train

    if os.path.isdir(config["cwd"]):  # Ray Train starts its workers in its run folder: the config's relative
        os.chdir(config["cwd"])        # paths (`workdir: runs/x`, a model config file) mean the driver's folder
    t = config["config"]["train"]
    with torch_threads(t["threads"] or max(1, int(t["cpus_per_worker"]))):  # a pool per core in each worker oversubscribes
        r = train_worker(config)
    if ray.train.get_context().get_world_rank() == 0:
        Store(config["out"]).write_json("_worker_result.json", r)
