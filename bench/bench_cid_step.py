"""One CLIP-CID training step (cluster discrimination over k centres with PartialFC ratio r, + instance
discrimination) ÷ one plain `clip` step of the same student, same batch, same run; and the extra peak memory
of the cluster head.

    python bench/bench_cid_step.py --model cid-tiny-rn-text3 \
        --model-config runs/demo/train/student_arch/cid-tiny-rn-text3.json     # the demo's student, k=10^6, r=0.1
    python bench/bench_cid_step.py --model ViT-B-32 --batch 256 --teacher-dim 768 --device cuda
    python bench/bench_cid_step.py --model ViT-B-32 --batch 256 --teacher-dim 768 --steps 3 --warmup 1   # CPU
"""
import argparse
import resource
import statistics
import time

import torch


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="cid-tiny-rn")
    ap.add_argument("--model-config", default="", help="JSON config registering --model (e.g. a train stage's student_arch/*.json)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--k", type=int, default=1_000_000)
    ap.add_argument("--r", type=float, default=0.1)
    ap.add_argument("--teacher-dim", type=int, default=384)  # the demo teacher's width
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    ap.add_argument("--precision", default="bf16")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    from cidistill.core.runtime import quiet_logs

    quiet_logs()  # open_clip's "No pretrained weights loaded" for a student built from scratch
    from kd.losses import DistillHeads
    from cidistill.core.models import autocast as _autocast, count_params, create
    from kd.train import TrainModule
    from cidistill.core.config import LossConfig

    dev = torch.device(a.device)
    torch.manual_seed(0)
    lm = create(a.model, model_config=a.model_config)
    size = lm.model_cfg["vision_cfg"]["image_size"]
    size = size if isinstance(size, int) else size[0]
    ctx = lm.model_cfg.get("text_cfg", {}).get("context_length", 77)
    images = torch.randn(a.batch, 3, size, size, device=dev)
    tokens = torch.randint(1, 1000, (a.batch, ctx), device=dev)
    batch = {"t_img": torch.nn.functional.normalize(torch.randn(a.batch, a.teacher_dim, device=dev), dim=-1),
             "t_txt": torch.nn.functional.normalize(torch.randn(a.batch, a.teacher_dim, device=dev), dim=-1),
             "cluster_id": torch.randint(0, a.k, (a.batch,), device=dev), "has_zh": None}
    loss_cfg = LossConfig(partial_fc_r=a.r)

    def bench(module, weights) -> float:
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        times = []
        for i in range(a.steps + a.warmup):
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            with _autocast(a.precision, dev):
                loss = sum(module(images, tokens, None, batch, weights, loss_cfg).values())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    clip_module = TrainModule(lm.model, DistillHeads(lm.embed_dim, a.teacher_dim)).to(dev)
    t_clip = bench(clip_module, {"clip": 1.0})
    mem0 = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else rss_mb()
    centroids = torch.nn.functional.normalize(torch.randn(a.k, a.teacher_dim), dim=-1)
    cid_module = TrainModule(lm.model, DistillHeads(lm.embed_dim, a.teacher_dim, centroids)).to(dev)
    t_cid = bench(cid_module, {"cluster": 1.0, "instance": 1.0})
    mem1 = torch.cuda.max_memory_allocated() / 2**20 if dev.type == "cuda" else rss_mb()
    centres_mb = a.k * a.teacher_dim * 4 / 2**20
    print(f"student {a.model} ({count_params(lm.model):,} params), batch {a.batch}, {a.precision} on {a.device}")
    print(f"clip step {1000 * t_clip:.1f} ms | CID step (k={a.k:,}, r={a.r}) {1000 * t_cid:.1f} ms")
    print(f"ratio CID/clip = {t_cid / t_clip:.2f}  (goal <= 1.15)")
    print(f"cluster head: centres {centres_mb:.0f} MiB (fp32, frozen); peak memory +{mem1 - mem0:.0f} MiB over the clip step"
          + ("" if dev.type == "cuda" else f" (process RSS: includes this script's own {centres_mb:.0f} MiB source copy)"))


if __name__ == "__main__":
    main()
