"""Embed stage throughput (Ray Data actor pool, from webdataset shards to parquet) / a bare encode_image
loop over already-decoded tensors with the same model, batch and threads, measured in the same run.

    python bench/bench_embed.py --workdir runs/demo     # needs a finished download stage there
"""
import argparse
import shutil
import tempfile
import time

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--model", default="")
    ap.add_argument("--pretrained", default="")
    ap.add_argument("--batch", type=int, default=256)
    a = ap.parse_args()
    from pipeline.demo import demo_config
    from pipeline.embed import EmbedStage
    from pipeline.runtime import init_ray
    from pipeline.stage import Store
    from kd.models import create

    cfg = demo_config(a.workdir, small=False)
    prev = Store(cfg.stage_dir("embed")).read_json("_DONE")["config"]["teacher"] if Store(cfg.stage_dir("embed")).exists("_DONE") else {}
    cfg.teacher.model = a.model or prev.get("model", cfg.teacher.model)
    cfg.teacher.pretrained = a.pretrained or prev.get("pretrained", "")
    cfg.teacher.batch_size = a.batch
    init_ray(num_cpus=2)
    out = tempfile.mkdtemp()
    cfg.dirs = {"embed": out}
    t = time.perf_counter()
    stats = EmbedStage(cfg).run()
    stage_ips = stats["embedded"] / (time.perf_counter() - t)
    shutil.rmtree(out)
    lm = create(cfg.teacher.model, cfg.teacher.pretrained)
    lm.model.eval()
    torch.set_num_threads(int(cfg.teacher.threads or cfg.teacher.cpus_per_actor))
    s = lm.model_cfg["vision_cfg"]["image_size"]
    x = torch.randn(a.batch, 3, s, s)
    n, t = 0, time.perf_counter()
    with torch.no_grad():
        while time.perf_counter() - t < 20:
            lm.model.encode_image(x)
            n += a.batch
    bare_ips = n / (time.perf_counter() - t)
    print(f"embed stage {stage_ips:.0f} img/s (incl. Ray start-up, decode, text towers, parquet) vs bare "
          f"encode_image {bare_ips:.0f} img/s -> ratio {stage_ips / bare_ips:.2f} ({cfg.teacher.model})")


if __name__ == "__main__":
    main()
