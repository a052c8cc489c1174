"""The training loop: a student open_clip model learns from the teacher's precomputed embeddings (never the
teacher itself), the kept set and the k-means pseudo-labels, through a schedule of phases of weighted losses.

Read it top to bottom: `train_worker` sets a worker up (`setup`), resumes (`checkpoint.load_checkpoint`), then
loops `get_batch` → `train_step` → `log_step` → `save_checkpoint`. One worker runs in this process; more run
under Ray Train's TorchTrainer (DDP: gloo on CPU, nccl on GPU). Batches, augmentations and PartialFC samples
are functions of (seed, step), so resuming from a checkpoint reaches the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn

from cidistill.core import faults
from cidistill.core.config import Config, from_dict
from cidistill.core.errors import StageError
from cidistill.core.runtime import resolve_precision
from cidistill.core.progress import Progress
from cidistill.core.models import by_length, count_params, create, encode_text, trim_vocab
from cidistill.core.store import Store
from .checkpoint import clean_partial, latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from .data import Pairs, augment, batch_indices, load_pairs, standardise
from .losses import DistillHeads, compute_losses
from .text_tower import student_with_teacher_text

TEACHER_LOSSES = ("instance", "feature_distill", "cluster")


class TrainingDiverged(StageError):
    pass


class TrainModule(nn.Module):
    """Student + heads as one module (what DDP wraps). `text_cache` holds a locked HF text trunk's pooled
    output per caption, so a LiT model trains only its projection on the text side."""

    def __init__(self, student: nn.Module, heads: DistillHeads, text_cache: torch.Tensor | None = None):
        super().__init__()
        self.student, self.heads = student, heads
        self.register_buffer("text_cache", text_cache, persistent=False)

    def forward(self, images, tokens, tokens_zh, rows, batch: dict, weights: dict, loss_cfg) -> dict:
        """Student embeddings, then the weighted loss terms: all inside forward, as DDP requires."""
        img = self.student.encode_image(images)
        if self.text_cache is not None:
            out = {"img": img, "txt": self.student.text.proj(self.text_cache[rows])}
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

    return {k: torch.cat(all_gather(v.contiguous()) if v.requires_grad else _gather_nograd(v))
            if isinstance(v, torch.Tensor) else v for k, v in tensors.items()}


def _gather_nograd(v: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(v) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, v.contiguous())
    return parts


def autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device.type))
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


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
    text = model.text

    def pooled(x):
        mask = (x != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=x, attention_mask=mask), mask)

    return by_length(model, tokens, pooled, chunks=-(-len(tokens) // batch))


@dataclass
class Worker:
    """What one worker holds while it trains."""
    cfg: Config
    job: dict
    rank: int
    world: int
    device: torch.device
    out: Path
    pairs: Pairs
    tokens: torch.Tensor
    tokens_zh: torch.Tensor | None
    has_zh: torch.Tensor | None
    module: TrainModule
    model: nn.Module              # the module, DDP-wrapped when world > 1
    opt: torch.optim.Optimizer
    params: list
    mean: tuple
    std: tuple
    student_name: str
    student_model_config: str


def worker_rank(job: dict) -> tuple[int, int]:
    if not job.get("distributed"):
        return 0, 1
    import ray.train

    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def build_student(cfg: Config, job: dict, out: Path):
    """The student, the training pairs and their tokens (vocabulary cut or trimmed to the corpus).
    The order of the steps is the order the random initialisations are drawn in: keep it."""
    tc, sc = cfg.train, cfg.student
    weights_any = {k for ph in tc.phases for k, w in ph.losses.items() if w}
    lm = create(sc.model, sc.pretrained, sc.model_config,
                context_length=None if job.get("lock_text") else sc.context_length)
    size = lm.model_cfg["vision_cfg"]["image_size"]
    balanced = tc.use_balanced and Store(cfg.stage_dir("balance")).exists("_DONE")
    pairs = load_pairs(cfg, image_size=size if isinstance(size, int) else size[0], split="train",
                       teacher=bool(weights_any & set(TEACHER_LOSSES)), clusters="cluster" in weights_any,
                       balanced=balanced)
    use_zh = job.get("chinese", True) and any(pairs.captions_zh)
    model_config = sc.model_config
    if sc.text_from_teacher and not job.get("lock_text"):
        lm, model_config = student_with_teacher_text(cfg, lm, pairs.captions + (pairs.captions_zh if use_zh else []), out)
    tokens = lm.tokenizer(pairs.captions)
    tokens_zh = lm.tokenizer([c or pairs.captions[i] for i, c in enumerate(pairs.captions_zh)]) if use_zh else None
    has_zh = torch.tensor([bool(c) for c in pairs.captions_zh]) if use_zh else None
    text_cache = None
    if job.get("lock_text"):
        lm.model.lock_text_tower()
        text_cache = locked_text_features(lm.model, tokens)
    elif sc.trim_vocab and not sc.text_from_teacher:  # a tower cut from the teacher has its corpus vocabulary
        old2new = trim_vocab(lm.model, torch.cat([tokens] + ([tokens_zh] if tokens_zh is not None else [])))
        tokens = old2new[tokens]
        tokens_zh = old2new[tokens_zh] if tokens_zh is not None else None
    return lm, model_config, pairs, tokens, tokens_zh, has_zh, text_cache, "cluster" in weights_any


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
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    clean_partial(out)
    lm, model_config, pairs, tokens, tokens_zh, has_zh, text_cache, clusters = build_student(cfg, job, out)
    centroids = None
    if clusters:
        import numpy as np

        centroids = torch.from_numpy(np.load(Path(cfg.stage_dir("cluster")) / "centroids.npy"))
    teacher_dim = pairs.t_img.shape[1] if pairs.t_img is not None else lm.embed_dim
    heads = DistillHeads(lm.embed_dim, teacher_dim, centroids, cfg.train.loss.learn_centres,
                         cfg.train.loss.instance_temperature)
    module = TrainModule(lm.model, heads, text_cache).to(device)
    opt, params = make_optimizer(cfg, module)
    mean = lm.preprocess_cfg.get("mean", (0.481, 0.458, 0.408))
    std = lm.preprocess_cfg.get("std", (0.269, 0.261, 0.276))
    return Worker(cfg, job, rank, world, device, out, pairs, tokens, tokens_zh, has_zh, module, module, opt, params,
                  mean, std, lm.name, model_config)


def get_batch(w: Worker, step: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """This worker's rows of global batch `step`: augmented, standardised images and the teacher's targets."""
    tc, pairs = w.cfg.train, w.pairs
    rows = batch_indices(len(pairs), tc.batch_size, step, tc.seed, w.rank, w.world)
    x = pairs.images[rows].float().div_(255)
    if tc.augment:  # each row's warp is drawn for the global batch, so any worker count sees the same
        gen = torch.Generator().manual_seed(tc.seed * 7919 + step * 31)
        per_rank = len(batch_indices(len(pairs), tc.batch_size, step, tc.seed, 0, w.world))
        x = augment(x, gen, offset=w.rank * per_rank, total=tc.batch_size, style=tc.style_augment)
    x = standardise(x, w.mean, w.std)

    def pick(t):
        return t[rows].to(w.device) if t is not None else None

    batch = {"cluster_id": pick(pairs.cluster_id), "t_img": pick(pairs.t_img), "t_txt": pick(pairs.t_txt),
             "has_zh": pick(w.has_zh)}
    return x, batch, rows


def train_step(w: Worker, step: int, phase, lr: float) -> tuple[torch.Tensor, dict]:
    tc = w.cfg.train
    for g in w.opt.param_groups:
        g["lr"] = lr * g["lr_scale"]
    x, batch, rows = get_batch(w, step)
    torch.manual_seed(tc.seed * 104729 + step)  # PartialFC's negative sample and any dropout
    with autocast(tc.precision, w.device):
        terms = w.model(x.to(w.device), w.tokens[rows].to(w.device),
                        w.tokens_zh[rows].to(w.device) if w.tokens_zh is not None else None, rows.to(w.device),
                        batch, phase.losses, tc.loss)
    loss = sum(terms.values())
    if not torch.isfinite(loss):
        good = latest_checkpoint(w.out)
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
    ckpt = latest_checkpoint(w.out)
    step = load_checkpoint(ckpt, w.module, w.opt) if ckpt is not None else 0
    if ckpt is not None and w.rank == 0:
        print(f"[train] resuming from {ckpt.name}")
    if w.world > 1:
        w.model = nn.parallel.DistributedDataParallel(w.module, find_unused_parameters=True)
    total = sum(ph.steps for ph in tc.phases)
    if w.rank == 0:
        truncate_log(w.out / "log.jsonl", step)
    log_f = open(w.out / "log.jsonl", "a") if w.rank == 0 else None
    bar = Progress(total, "train", unit="step", initial=step, disable=w.rank != 0)
    t_start, t_log, last = time.time(), time.time(), {}
    while step < total:
        pi, phase, sip = phase_at(tc.phases, step)
        lr = lr_at(sip, phase.steps, tc.lr, tc.warmup_steps)
        loss, terms = train_step(w, step, phase, lr)
        step += 1
        bar.update()
        faults.point()
        if step % tc.log_every == 0 or step == total:
            last = log_record(w, step, pi, loss, terms, lr, time.time() - t_log)
            t_log = time.time()
            if log_f:
                log_f.write(json.dumps(last) + "\n")
                log_f.flush()
                bar.set_postfix(loss=f"{last['loss']:.3f}", phase=pi)
        if w.rank == 0 and (step % tc.ckpt_every == 0 or step == total):
            save_checkpoint(w.out, step, w.module, w.opt)
        if job.get("stop_after") and step >= job["stop_after"]:
            break
    bar.close()
    if log_f:
        log_f.close()
    return worker_result(w, step, time.time() - t_start, last)


def worker_result(w: Worker, step: int, seconds: float, last: dict) -> dict:
    result = {"steps": step, "seconds": seconds, "pairs": len(w.pairs), "data": w.pairs.stats,
              "student_params": count_params(w.module.student), "last": last, "workers": w.world,
              "student_model": w.student_name, "student_model_config": w.student_model_config}
    if w.world > 1:  # where each rank ran (shows the placement across nodes)
        import ray

        nodes = [None] * w.world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        result["worker_nodes"] = nodes
    return result


def train(cfg: Config, out_dir: str, *, use_ray: bool = True, lock_text: bool = False, chinese: bool = True,
          stop_after: int = 0) -> dict:
    """Train into out_dir (resuming from its last checkpoint): in this process, or on Ray Train workers."""
    job = {"config": asdict(cfg), "out": str(Path(out_dir).resolve()), "lock_text": lock_text,
           "chinese": chinese, "stop_after": stop_after}
    if cfg.train.workers <= 1 or not use_ray:
        return train_worker(job)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job["distributed"] = True
    trainer = TorchTrainer(_ray_loop, train_loop_config=job,
                           scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                                        resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
                           torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
                           run_config=RunConfig(name="cidistill-train", storage_path=str(Path(out_dir).resolve() / "_ray")))
    trainer.fit()
    return json.loads((Path(out_dir) / "_worker_result.json").read_text())


def _ray_loop(config: dict) -> None:
    import ray.train

    r = train_worker(config)
    if ray.train.get_context().get_world_rank() == 0:
        (Path(config["out"]) / "_worker_result.json").write_text(json.dumps(r))
