"""The training library's three stages for the driver (cidistill.core.stage): train, eval and export, each
one unit of work. Their folders are on the store like every stage's (a local folder or an object store)."""
from __future__ import annotations

import io
import json

import numpy as np

from cidistill.core.config import Config
from cidistill.core.models import check_model, check_model_config, configs_of, count_params, create
from cidistill.core.progress import Progress
from cidistill.core.schema import HOLDOUT_FIELDS, has_holdout
from cidistill.core.stage import Stage
from cidistill.core.store import Store, join
from .checkpoint import latest_checkpoint
from .evaluate import PARTS, evaluate, load_for_eval, teacher_evaluation
from .metrics import results_markdown
from .export import check_onnx_installed, export_local_dir, load_trained_student, model_card
from .stream import StreamSpec
from .text_tower import check_teacher_text
from .train import require_workers, train

TEACHER_FIELDS = ("teacher.model", "teacher.pretrained", "teacher.model_config")


def write_final(out: Store, cfg: Config, result: dict) -> None:
    """train/model.safetensors + student.json: what eval and export load."""
    ckpt = latest_checkpoint(out)
    out.write_bytes("model.safetensors", out.read_bytes(f"{ckpt}/model.safetensors"))
    out.write_json("student.json", {
        "model": result.get("student_model", cfg.student.model),
        "model_config": result.get("student_model_config", cfg.student.model_config),
        "context_length": cfg.student.context_length, "checkpoint": ckpt})


class TrainStage(Stage):
    name = "train"
    inputs = ("pack", "cluster")
    reads = ("student", "train") + TEACHER_FIELDS
    ignores = ("train.use_balanced",)  # the pack stage applies it

    def check_inputs(self) -> None:
        # the shards fill its streams and batches (the small demo's teacher, trained by the demo itself on 200
        # pairs with batch 128, is a test fixture and does not pass here)
        if self.use_ray and self.cfg.train.workers > 1:
            require_workers(self.cfg.train)
        StreamSpec.of(self.require("pack").uri, "train", self.cfg.train).check_batch()

    def check_config(self) -> None:
        """The student as configured can be built: a typo in its name, weights or config file, or more text
        layers than the teacher has, fails before the run's first stage and before the last student is cleared."""
        sc, tc = self.cfg.student, self.cfg.teacher
        check_model(sc.model, sc.pretrained, sc.model_config, "student")
        if sc.text_from_teacher:
            teacher_cfg = configs_of(tc.model, tc.pretrained, check_model_config(tc.model_config, "teacher.model_config"))[0]
            check_teacher_text(teacher_cfg, sc.text_from_teacher)

    def run_unit(self, unit: str) -> dict:  # check_inputs has required the pack stage
        result = train(self.cfg, self.out.uri, use_ray=self.use_ray)
        write_final(self.out, self.cfg, result)
        return result

    def summary(self, stats: dict) -> str:
        return (f"{stats['steps']} steps on {stats['pairs']} pairs, "
                f"final loss {stats['last'].get('loss', float('nan')):.3f}")


class EvalStage(Stage):
    """The student on the held-out split, and the teacher beside it when the config names its weights."""
    name = "eval"
    inputs = ("pack", "train")
    reads = ("eval",) + HOLDOUT_FIELDS + TEACHER_FIELDS

    def check_inputs(self) -> None:
        self.require("pack")
        self.require("train")

    def run_unit(self, unit: str) -> dict:
        results, per = {}, {}
        bar = Progress(len(PARTS) * (2 if self.cfg.teacher.pretrained else 1), "eval", unit="part", rate=False)

        def done(who):
            def part_done(part):
                bar.set_postfix(done=f"{who}.{part}")
                bar.update()
            return part_done

        if self.cfg.teacher.pretrained:
            results["teacher"], per["teacher"] = teacher_evaluation(self.cfg, load_for_eval(self.cfg, "teacher"),
                                                                    done("teacher"))
        results["student"], per["student"] = evaluate(self.cfg, load_for_eval(self.cfg, "student"),
                                                      done=done("student"))
        bar.close()
        if "teacher" in results:
            results["student_vs_teacher"] = ratios(results["student"], results["teacher"])
        md = results_markdown({k: v for k, v in results.items() if "params" in v})
        if "student_vs_teacher" in results:
            md += "\n" + "\n".join(f"- {k}: {v:.3f}" for k, v in results["student_vs_teacher"].items()) + "\n"
        skipped, notes = results["student"].get("skipped", {}), results["student"].get("notes", {})
        if skipped or notes:
            md += "\n" + "\n".join([f"- {k} {why}" for k, why in notes.items()]
                                   + [f"- skipped {k}: {why}" for k, why in skipped.items()]) + "\n"
        for name, arrays in per.items():
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            self.out.write_bytes(f"{name}_correct.npz", buf.getvalue())
        results["held_out_split"] = has_holdout(self.cfg)
        if not results["held_out_split"]:
            md += "\n**Measured on training pairs**: no held-out split (data.holdout empty, data.holdout_fraction 0).\n"
            print("[eval] warning: no held-out split (data.holdout_fraction=0): these numbers are on training pairs")
        self.out.write_bytes("results.md", md.encode())
        self.out.write_json("results.json", results)
        return results

    def summary(self, stats: dict) -> str:
        """Only what was measured: the tasks that ran, each language that has captions."""
        s, parts = stats.get("student", {}), []
        zs = [f"{lang.upper()} {100 * s[f'zeroshot_{lang}_top1']:.1f}%" for lang in ("en", "zh")
              if f"zeroshot_{lang}_top1" in s]
        notes = s.get("notes", {})
        if zs:
            parts.append("zero-shot top-1 " + " / ".join(zs) + (f" ({notes['zeroshot']})" if "zeroshot" in notes else ""))
        if "probe_top1" in s:
            parts.append(f"probe {100 * s['probe_top1']:.1f}%" + (f" ({notes['linear_probe']})" if "linear_probe" in notes else ""))
        for lang in ("en", "zh"):
            if f"retrieval_{lang}" in s:
                parts.append(f"I→T R@1 {lang.upper()} {100 * s[f'retrieval_{lang}']['i2t_r@1']:.1f}%"
                             + (f" ({notes[f'retrieval_{lang}']})" if f"retrieval_{lang}" in notes else ""))
        where = "held-out" if stats.get("held_out_split") else "TRAINING (no held-out split: data.holdout_fraction=0)"
        skipped = "; skipped: " + ", ".join(f"{k} ({why})" for k, why in s["skipped"].items()) if s.get("skipped") else ""
        return f"student on {s.get('eval_images', 0)} {where} images: " + ", ".join(parts or ["no task ran"]) + skipped


def ratios(s: dict, t: dict) -> dict:
    """The student against its teacher, for what both measured."""
    out = {}
    # a ratio over a zero score is no measurement (it read 5e7 with a student at 0 % EN)
    if "zeroshot_en_top1" in s and t.get("zeroshot_en_top1"):
        out["zeroshot_en_retention"] = s["zeroshot_en_top1"] / t["zeroshot_en_top1"]
    if "zeroshot_zh_top1" in s and s.get("zeroshot_en_top1"):
        out["student_zh_over_en"] = s["zeroshot_zh_top1"] / s["zeroshot_en_top1"]
    out["params_ratio"] = s["params"] / t["params"]
    out["throughput_ratio"] = s["image_throughput"] / t["image_throughput"]
    return out


class ExportStage(Stage):
    name = "export"
    inputs = ("train", "eval")
    reads = ("export",) + TEACHER_FIELDS

    def check_inputs(self) -> None:  # eval is optional: its results go into the export's README when there
        self.require("train")

    def check_config(self) -> None:
        if self.cfg.export.onnx:
            check_onnx_installed()

    def run_unit(self, unit: str) -> dict:
        cfg, root = self.cfg, self.out
        student = load_trained_student(cfg)
        facts = {"distilled from": f"{cfg.teacher.model} {cfg.teacher.pretrained}",
                 "training recipe": json.dumps([{"steps": p.steps, "losses": p.losses} for p in cfg.train.phases]),
                 "data card": join(cfg.stage_dir("card"), "card.html")}
        readme = model_card("cidistill student", student, facts)
        evald = Store(cfg.stage_dir("eval"), create=False)
        if evald.exists("results.md"):
            readme += "\n## Evaluation\n\n" + evald.read_bytes("results.md").decode()
        diffs = export_local_dir(student, root.url("student"), readme, onnx=cfg.export.onnx)
        stats = {"student": root.url("student"), "student_params": count_params(student.model)}
        if cfg.teacher.pretrained:
            teacher = create(cfg.teacher.model, cfg.teacher.pretrained, cfg.teacher.model_config)
            export_local_dir(teacher, root.url("teacher"),
                             model_card("cidistill teacher", teacher, {"source": cfg.teacher.pretrained}))
            stats["teacher"] = root.url("teacher")
        if cfg.export.onnx:
            stats["onnx_max_abs_diff"] = diffs
        return stats

    def summary(self, stats: dict) -> str:
        return (f"student -> {stats['student']} ({stats['student_params']:,} params)"
                + (f", teacher -> {stats['teacher']}" if "teacher" in stats else ""))
