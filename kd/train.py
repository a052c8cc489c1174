"""The training loop: a student open_clip model learns from the teacher's precomputed embeddings (never the
teacher itself), the kept set and the k-means pseudo-labels, through a schedule of phases of weighted losses.

One worker runs in this process; more run under Ray Train's TorchTrainer (DDP: gloo on CPU, nccl on GPU).
Batches, augmentations and PartialFC samples are functions of (seed, step), so `resume` from a checkpoint
reaches the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from pipeline import faults
from pipeline.config import Config, from_dict
from pipeline.stage import StageError, Store, already_done
from .data import augment, batch_indices, load_pairs, standardise
from .losses import DistillHeads, compute_losses
from .models import count_params, create, by_length, encode_text, trim_vocab
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


def _autocast(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def _lr(step_in_phase: int, phase_steps: int, base: float, warmup: int) -> float:
    warmup = min(warmup, max(1, phase_steps // 5))
    if step_in_phase < warmup:
        return base * (step_in_phase + 1) / warmup
    t = (step_in_phase - warmup) / max(1, phase_steps - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * t))


def _phase_at(phases, step: int):
    start = 0
    for i, ph in enumerate(phases):
        if step < start + ph.steps:
            return i, ph, step - start
        start += ph.steps
    return len(phases) - 1, phases[-1], phases[-1].steps


@torch.no_grad()
def _locked_text_features(model, tokens: torch.Tensor, batch: int = 512) -> torch.Tensor:
    text = model.text

    def pooled(x):
        mask = (x != text.config.pad_token_id).long()
        return text.pooler(text.transformer(input_ids=x, attention_mask=mask), mask)

    return by_length(model, tokens, pooled, chunks=-(-len(tokens) // batch))


def _truncate_log(path: Path, step: int) -> None:
    """On resume, drop log lines of steps after the checkpoint (a killed run logged them; they are redone)."""
    if not path.exists():
        return
    keep = []
    for ln in path.read_text().splitlines():
        try:
            if json.loads(ln)["step"] <= step:
                keep.append(ln)
        except (ValueError, KeyError):  # a line the kill cut short
            pass
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in out.glob("step-*") if (p / "meta.json").exists())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, module: TrainModule, opt, keep: int = 2) -> Path:
    """Atomic: write into a temp folder, rename it into place; meta.json inside marks it complete."""
    from safetensors.torch import save_file

    final = out / f"step-{step:07d}"
    tmp = out / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.student.state_dict().items()}, tmp / "model.safetensors")
    save_file({k: v.contiguous() for k, v in module.heads.state_dict().items()}, tmp / "heads.safetensors")
    torch.save({"optimizer": opt.state_dict(), "step": step}, tmp / "state.pt")
    (tmp / "meta.json").write_text(json.dumps({"step": step, "time": time.time()}))
    faults.point()
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in out.glob("step-*") if p != final)[:-(keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def train_worker(job: dict) -> dict:
    """Everything one worker does. `job` = {"config": dict, "out": folder}; rank/world from Ray Train."""
    cfg = from_dict(Config, job["config"])
    tc, sc = cfg.train, cfg.student
    rank, world = 0, 1
    if job.get("distributed"):
        import ray.train

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = torch.device("cuda" if tc.use_gpu and torch.cuda.is_available() else "cpu")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    out = Path(job["out"])
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(".tmp-step-*"):  # a checkpoint a killed run did not finish
        shutil.rmtree(leftover, ignore_errors=True)

    # -- data: what the phases need, nothing more
    weights_any = {k for ph in tc.phases for k, w in ph.losses.items() if w}
    need_teacher = bool(weights_any & set(TEACHER_LOSSES))
    need_clusters = "cluster" in weights_any
    lm = create(sc.model, sc.pretrained, sc.model_config, context_length=None if job.get("lock_text") else sc.context_length)
    size = lm.model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    balanced = tc.use_balanced and Store(cfg.stage_dir("balance")).exists("_DONE")
    pairs = load_pairs(cfg, image_size=size, teacher=need_teacher, clusters=need_clusters, balanced=balanced,
                       split="train")
    use_zh = job.get("chinese", True) and any(pairs.captions_zh)
    student_model_config = sc.model_config
    if sc.text_from_teacher and not job.get("lock_text"):
        lm, student_model_config = student_with_teacher_text(cfg, lm, pairs.captions + (pairs.captions_zh if use_zh else []), out)
    tokens = lm.tokenizer(pairs.captions)
    tokens_zh = lm.tokenizer([c or pairs.captions[i] for i, c in enumerate(pairs.captions_zh)]) if use_zh else None
    has_zh = torch.tensor([bool(c) for c in pairs.captions_zh]) if use_zh else None

    student = lm.model
    text_cache = None
    if job.get("lock_text"):
        student.lock_text_tower()
        text_cache = _locked_text_features(student, tokens)
    elif sc.trim_vocab and not sc.text_from_teacher:  # a tower cut from the teacher has its corpus vocabulary
        old2new = trim_vocab(student, torch.cat([tokens] + ([tokens_zh] if tokens_zh is not None else [])))
        tokens = old2new[tokens]
        tokens_zh = old2new[tokens_zh] if tokens_zh is not None else None
    teacher_dim = pairs.t_img.shape[1] if pairs.t_img is not None else lm.embed_dim
    centroids = None
    if need_clusters:
        import numpy as np

        centroids = torch.from_numpy(np.load(Path(cfg.stage_dir("cluster")) / "centroids.npy"))
    heads = DistillHeads(lm.embed_dim, teacher_dim, centroids, tc.loss.learn_centres, tc.loss.instance_temperature)
    module = TrainModule(student, heads, text_cache).to(device)
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    # pretrained text layers (a tower cut from the teacher) learn slower than what starts from scratch
    slow = {id(p) for n, p in named if sc.text_from_teacher and n.startswith("student.text.transformer.")
            and "word_embeddings" not in n}
    groups = []
    for scale, picked in ((1.0, [p for p in params if id(p) not in slow]),
                          (sc.text_lr_scale, [p for p in params if id(p) in slow])):
        groups += [{"params": [p for p in picked if p.ndim >= 2], "weight_decay": tc.weight_decay, "lr_scale": scale},
                   {"params": [p for p in picked if p.ndim < 2], "weight_decay": 0.0, "lr_scale": scale}]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=tc.lr, betas=(0.9, 0.98), eps=1e-6)
    step = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:  # resume
        from safetensors.torch import load_file

        student.load_state_dict(load_file(ckpt / "model.safetensors"))
        heads.load_state_dict(load_file(ckpt / "heads.safetensors"))
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        if rank == 0:
            print(f"[train] resuming from {ckpt.name}")
    model = module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(module, find_unused_parameters=True)

    total = sum(ph.steps for ph in tc.phases)
    mean, std = lm.preprocess_cfg.get("mean", (0.481, 0.458, 0.408)), lm.preprocess_cfg.get("std", (0.269, 0.261, 0.276))
    if rank == 0:
        _truncate_log(out / "log.jsonl", step)
    log_f = open(out / "log.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=total, initial=step, desc="train", disable=rank != 0, leave=False)
    t_start, t_log, last = time.time(), time.time(), {}
    while step < total:
        pi, phase, sip = _phase_at(tc.phases, step)
        lr = _lr(sip, phase.steps, tc.lr, tc.warmup_steps)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        rows = batch_indices(len(pairs), tc.batch_size, step, tc.seed, rank, world)
        x = pairs.images[rows].float().div_(255)
        if tc.augment:  # each row's warp is drawn for the global batch, so any worker count sees the same
            gen = torch.Generator().manual_seed(tc.seed * 7919 + step * 31)
            per_rank = len(batch_indices(len(pairs), tc.batch_size, step, tc.seed, 0, world))
            x = augment(x, gen, offset=rank * per_rank, total=tc.batch_size, style=tc.style_augment)
        x = standardise(x, mean, std)
        batch = {"cluster_id": pairs.cluster_id[rows].to(device) if pairs.cluster_id is not None else None,
                 "t_img": pairs.t_img[rows].to(device) if pairs.t_img is not None else None,
                 "t_txt": pairs.t_txt[rows].to(device) if pairs.t_txt is not None else None,
                 "has_zh": has_zh[rows].to(device) if has_zh is not None else None}
        torch.manual_seed(tc.seed * 104729 + step)  # PartialFC's negative sample and any dropout
        with _autocast(tc.precision, device):
            terms = model(x.to(device), tokens[rows].to(device),
                          tokens_zh[rows].to(device) if tokens_zh is not None else None, rows.to(device),
                          batch, phase.losses, tc.loss)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            good = latest_checkpoint(out)
            raise TrainingDiverged(f"step {step}: loss is not finite ({ {k: float(v) for k, v in terms.items()} });"
                                   f" last good checkpoint: {good or 'none'}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
        opt.step()
        with torch.no_grad():
            module.student.logit_scale.clamp_(0, math.log(100))
        step += 1
        bar.update()
        faults.point()
        if step % tc.log_every == 0 or step == total:
            vals = {k: float(v.detach()) for k, v in terms.items()}
            if world > 1:
                t = torch.tensor([float(loss)] + list(vals.values()))
                torch.distributed.all_reduce(t)
                t /= world
                loss_v, vals = float(t[0]), dict(zip(vals, t[1:].tolist()))
            else:
                loss_v = float(loss)
            now = time.time()
            last = {"step": step, "phase": pi, "loss": loss_v, **vals, "lr": lr,
                    "samples_per_s": tc.batch_size * tc.log_every / max(now - t_log, 1e-9)}
            t_log = now
            if log_f:
                log_f.write(json.dumps(last) + "\n")
                log_f.flush()
                bar.set_postfix(loss=f"{loss_v:.3f}", phase=pi)
        if rank == 0 and (step % tc.ckpt_every == 0 or step == total):
            save_checkpoint(out, step, module, opt)
        if job.get("stop_after") and step >= job["stop_after"]:
            break
    bar.close()
    if log_f:
        log_f.close()
    result = {"steps": step, "seconds": time.time() - t_start, "pairs": len(pairs), "data": pairs.stats,
              "student_params": count_params(student), "last": last, "workers": world,
              "student_model": lm.name, "student_model_config": student_model_config}
    if world > 1:  # where each rank ran (shows the placement across nodes)
        import ray

        nodes = [None] * world
        torch.distributed.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
        result["worker_nodes"] = nodes
    return result


def train(cfg: Config, out_dir: str, *, use_ray: bool = True, lock_text: bool = False, chinese: bool = True,
          stop_after: int = 0) -> dict:
    job = {"config": asdict(cfg), "out": str(Path(out_dir).resolve()), "lock_text": lock_text,
           "chinese": chinese, "stop_after": stop_after}
    if cfg.train.workers <= 1 or not use_ray:
        return train_worker(job)
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    job["distributed"] = True
    result = {}

    def loop(config):
        import ray.train

        r = train_worker(config)
        if ray.train.get_context().get_world_rank() == 0:
            (Path(config["out"]) / "_worker_result.json").write_text(json.dumps(r))

    trainer = TorchTrainer(loop, train_loop_config=job,
                           scaling_config=ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                                        resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
                           torch_config=TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
                           run_config=RunConfig(name="cidistill-train", storage_path=str(Path(out_dir).resolve() / "_ray")))
    trainer.fit()
    result = json.loads((Path(out_dir) / "_worker_result.json").read_text())
    return result


def write_final(out: Path, cfg: Config, result: dict) -> None:
    """train/model.safetensors + student.json: what eval and export load."""
    ckpt = latest_checkpoint(out)
    shutil.copyfile(ckpt / "model.safetensors", out / "model.safetensors.tmp")
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    st = Store(str(out))
    st.write_json("student.json", {"model": result.get("student_model", cfg.student.model),
                                   "model_config": result.get("student_model_config", cfg.student.model_config),
                                   "context_length": cfg.student.context_length, "checkpoint": ckpt.name})


def run_stage(cfg: Config, force: bool = False, use_ray: bool = True) -> dict:
    out = Path(cfg.stage_dir("train"))
    st = Store(str(out))
    done = already_done(st, "train", force=force)
    if done is not None:
        return done
    if force:
        shutil.rmtree(out, ignore_errors=True)
        st = Store(str(out))
    result = train(cfg, str(out), use_ray=use_ray)
    write_final(out, cfg, result)
    st.write_json("stats.json", result)
    st.write_json("_DONE", {"stage": "train", "finished": time.time()})
    print(f"[train] done: {result['steps']} steps on {result['pairs']} pairs in {result['seconds']:.0f}s, "
          f"final loss {result['last'].get('loss', float('nan')):.3f}")
    return result
