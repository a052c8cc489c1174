"""Embed stage throughput (Ray Data actor pool, webdataset shards -> parquet) / a bare loop over
already-decoded tensors with the same model, batch, threads and precision, measured in the same run.
The steady rate is the difference of a 1-shard and an N-shard run of the stage (start-up cancels out).
Two anchors: `encode_image` alone (the issue's definition) and image + each distinct EN and ZH caption of
the batch (the same work the stage does: it embeds a caption repeated inside a batch once). Each anchor is
measured before and after the stage runs and the faster kept (a shared box drifts; the lower ratio).

    python bench/bench_embed.py --workdir runs/demo                          # the demo's teacher
    python bench/bench_embed.py --workdir runs/demo --model ViT-B-32 --shards 3
"""
import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch


def timed_loop(fn, seconds: float = 20.0) -> float:
    """Calls per second of fn after one warm-up call (at least 3 timed calls)."""
    fn()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds or n < 3:
        fn()
        n += 1
    return n / (time.perf_counter() - t)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/demo")
    ap.add_argument("--model", default="")
    ap.add_argument("--pretrained", default="")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--shards", type=int, default=0, help="embed only the first N download shards (0 = all)")
    a = ap.parse_args(argv)
    from cidistill.app.demo import demo_config
    from pipeline.embed import EmbedStage, TeacherEmbedder, _read_shard
    from cidistill.core.runtime import init_ray, quiet_logs
    from cidistill.core.store import Store
    from cidistill.core.images import decode_rgb
    from cidistill.core.models import autocast
    from cidistill.core.text_ops import encode_text
    from PIL import Image

    quiet_logs()  # Ray Data's "Dataset … execution finished" lines, as in the CLI

    cfg = demo_config(a.workdir, small=False)
    done = Store(cfg.stage_dir("embed"))
    fields = done.read_json("_DONE").get("fields", {}) if done.exists("_DONE") else {}
    prev = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith("teacher.")}
    if a.model:  # another teacher: random weights unless --pretrained (throughput does not depend on them)
        prev = {k: v for k, v in prev.items() if k not in ("model", "pretrained", "model_config")}
    for k, v in prev.items():
        if hasattr(cfg.teacher, k):  # a field an older version wrote is left out
            setattr(cfg.teacher, k, v)
    cfg.teacher.model = a.model or cfg.teacher.model
    cfg.teacher.pretrained = a.pretrained or prev.get("pretrained", "") or "random"
    cfg.teacher.batch_size = a.batch
    src = Path(cfg.stage_dir("download"))
    shards = sorted(p.stem for p in src.glob("*.tar"))[: a.shards or None]
    if len(shards) < 2:
        raise SystemExit("need at least 2 shards: the steady rate is the difference of a 1-shard and an N-shard run")
    tmp = Path(tempfile.mkdtemp())
    init_ray(num_cpus=2)

    def run_stage(names: list[str]) -> tuple[int, float]:
        sub = tmp / f"download-{len(names)}"
        sub.mkdir()
        for s in names:  # a download folder holding just these shards
            for ext in (".tar", ".parquet"):
                shutil.copy(src / f"{s}{ext}", sub / f"{s}{ext}")
        shutil.copy(src / "_DONE", sub / "_DONE")
        cfg.dirs = {"download": str(sub), "embed": str(tmp / f"embed-{len(names)}")}
        t = time.perf_counter()
        n = EmbedStage(cfg).run()["embedded"]
        return n, time.perf_counter() - t

    # anchor: the same model, threads and precision, on tensors decoded and tokenized beforehand
    emb = TeacherEmbedder(vars(cfg.teacher))
    rows = _read_shard({"shard": shards[0], "folder": str(src)})[: a.batch]
    x = torch.stack([emb.lm.preprocess_val(Image.fromarray(decode_rgb(r["image"], 0))) for r in rows])
    # the same work as the stage: each distinct caption of the batch once (the stage embeds repeats once)
    en = sorted({r["caption"] for r in rows})
    zh = sorted({r["caption_zh"] or r["caption"] for r in rows})
    tok_en, tok_zh = emb.lm.tokenizer(en), emb.lm.tokenizer(zh)

    @torch.no_grad()
    def image_only():
        with autocast(emb.precision, emb.device):
            emb.lm.model.encode_image(x)

    @torch.no_grad()
    def all_towers():
        with autocast(emb.precision, emb.device):
            emb.lm.model.encode_image(x)
            encode_text(emb.lm.model, tok_en)
            encode_text(emb.lm.model, tok_zh)

    # anchors before and after the stage runs, the faster of each kept (drift on a shared box; the
    # conservative choice for the ratios)
    before = [timed_loop(f) * len(x) for f in (image_only, all_towers)]
    n1, t1 = run_stage(shards[:1])
    n, t_all = run_stage(shards)
    shutil.rmtree(tmp)
    after = [timed_loop(f) * len(x) for f in (image_only, all_towers)]
    bare_img, bare_all = max(before[0], after[0]), max(before[1], after[1])
    stage_ips = n / t_all
    steady = (n - n1) / (t_all - t1)  # start-up (actor spawn, model load, first read) cancels out
    print(f"{cfg.teacher.model}, batch {len(x)}, {torch.get_num_threads()} threads, {emb.precision}, "
          f"{n} pairs in {len(shards)} shards; distinct captions in the anchor batch: EN {len(en)}, ZH {len(zh)}")
    print(f"embed stage {stage_ips:.1f} pairs/s end to end in {t_all:.0f}s (actor start-up, read, decode, EN+ZH "
          f"text, parquet); steady {steady:.1f} pairs/s = ({n} - {n1} pairs) / ({t_all:.1f} - {t1:.1f}s of a 1-shard run); "
          f"start-up ~{t1 - n1 / steady:.0f}s")
    for name, bare, b, f in (("encode_image", bare_img, before[0], after[0]),
                             ("image + distinct EN + ZH captions", bare_all, before[1], after[1])):
        print(f"bare {name} {bare:.1f}/s (before {b:.1f}, after {f:.1f}) -> ratio end to end {stage_ips / bare:.2f}, steady {steady / bare:.2f}")
    # the stage must embed the captions too: no pipeline, however thin, beats this ratio to encode_image
    print(f"the captions add {100 * (bare_img / bare_all - 1):.0f}% to the model's work: ceiling of the first ratio "
          f"{bare_all / bare_img:.2f}")


if __name__ == "__main__":
    main()
