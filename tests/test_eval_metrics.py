"""The evaluation's numbers on inputs whose answer is known."""
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from kd.metrics import linear_probe, mean_per_class, paired_test, recall_at, topk_correct


def test_recall_perfect_for_matching_pairs_and_chance_for_shuffled():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(200, 32, generator=g), dim=-1)
    r = recall_at(x, x)
    assert r["i2t_r@1"] == 1.0 and r["t2i_r@1"] == 1.0
    shuffled = recall_at(x, x[torch.randperm(200, generator=g)])
    assert shuffled["i2t_r@1"] < 0.05 and shuffled["t2i_r@10"] < 0.2


def test_recall_in_blocks_equals_the_full_similarity_matrix():
    """Ranks computed a block of rows at a time (bounded memory) equal those of the whole N x N matrix."""
    g = torch.Generator().manual_seed(1)
    img = F.normalize(torch.randn(300, 16, generator=g), dim=-1)
    txt = F.normalize(img + 0.8 * torch.randn(300, 16, generator=g), dim=-1)
    sim, idx = img @ txt.t(), torch.arange(300)
    full = {}
    for name, s in (("i2t", sim), ("t2i", sim.t())):
        rank = (s > s[idx, idx][:, None]).sum(1)
        full.update({f"{name}_r@{k}": float((rank < k).float().mean()) for k in (1, 5, 10)})
    for block in (7, 64, 1024):
        assert recall_at(img, txt, block=block) == full, block
    assert 0.05 < full["i2t_r@1"] < 0.95


def test_topk_counts_the_label_inside_the_top_k():
    img = torch.eye(4)
    cls = torch.eye(4)
    labels = torch.tensor([0, 1, 3, 2])
    assert topk_correct(img, cls, labels, 1).tolist() == [True, True, False, False]
    assert topk_correct(img, cls, labels, 4).all()


def test_linear_probe_learns_separable_classes_and_not_random_labels():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(10, 16)) * 3
    y = rng.integers(0, 10, 600)
    x = centres[y] + rng.normal(size=(600, 16))
    good = linear_probe(x[:500], y[:500], x[500:], y[500:])
    assert good["probe_top1"] > 0.9 and good["probe_C"] in (0.01, 0.1, 1.0)
    noise = linear_probe(x[:500], rng.integers(0, 10, 500), x[500:], y[500:])
    assert noise["probe_top1"] < 0.3


def test_paired_test_counts_discordant_images():
    a = np.array([True] * 30 + [False] * 70)
    b = np.array([False] * 30 + [False] * 70)
    r = paired_test(a, b)
    assert (r["a_only"], r["b_only"]) == (30, 0) and r["p_value"] < 1e-6
    assert paired_test(a, a)["p_value"] == 1.0


def test_mean_per_class_weighs_a_repeated_class_once():
    labels = np.array([7, 7, 7, 7, 2, 9])        # class 7 repeated (like one emoji's skin-tone variants)
    correct = np.array([True, True, True, True, False, False])
    assert correct.mean() == 4 / 6 and mean_per_class(correct, labels) == 1 / 3
    assert mean_per_class(np.ones(6, bool), labels) == 1.0


def test_teacher_scores_are_computed_once_per_teacher_data_and_settings(small_run, tmp_path, monkeypatch):
    """The eval stage's teacher scores come from the node's cache the second time: equal to a fresh
    evaluation (and to what the small demo's eval stage wrote), the image throughput measured again; other
    eval settings or other packed pairs are another entry."""
    import dataclasses
    import json
    import shutil

    import kd.evaluate as ev

    monkeypatch.setenv("CIDISTILL_CACHE", str(tmp_path / "cache"))
    real, calls = ev.evaluate, []
    monkeypatch.setattr(ev, "evaluate", lambda cfg, lm, tasks=None, **kw: calls.append(cfg.workdir) or real(cfg, lm, tasks, **kw))
    lm = ev.load_for_eval(small_run, "teacher")
    first, per1 = ev.teacher_evaluation(small_run, lm)
    second, per2 = ev.teacher_evaluation(small_run, lm)
    assert len(calls) == 1 and (tmp_path / "cache" / "teacher_eval").is_dir()
    wrote = json.loads(open(f"{small_run.stage_dir('eval')}/results.json").read())["teacher"]
    for got in (first, second):
        assert {k: v for k, v in got.items() if k != "image_throughput"} == \
               {k: v for k, v in wrote.items() if k != "image_throughput"}
        assert got["image_throughput"] > 0
    assert per1.keys() == per2.keys() and all(np.array_equal(per1[k], per2[k]) for k in per1)
    npz = next((tmp_path / "cache" / "teacher_eval").glob("*/correct.npz"))
    npz.write_bytes(npz.read_bytes()[:100])  # damaged in the cache (zipfile.BadZipFile, a traceback): computed again
    third, per3 = ev.teacher_evaluation(small_run, lm)
    assert len(calls) == 2 and all(np.array_equal(per1[k], per3[k]) for k in per1) and npz.stat().st_size > 100
    assert {k: v for k, v in third.items() if k != "image_throughput"} == \
           {k: v for k, v in first.items() if k != "image_throughput"}

    key = ev.teacher_eval_key(small_run)
    assert ev.teacher_eval_key(dataclasses.replace(small_run, eval=dataclasses.replace(small_run.eval, tasks=["retrieval"]))) != key
    # the throughput is measured again each time: how it is measured shapes no cached score
    assert ev.teacher_eval_key(dataclasses.replace(small_run, eval=dataclasses.replace(small_run.eval, throughput_reps=9))) == key
    with monkeypatch.context() as m:
        m.setenv("OPENBLAS_CORETYPE", "Prescott")  # another BLAS kernel rounds the probe's fit otherwise
        assert ev.teacher_eval_key(small_run) != key
    assert ev.teacher_eval_key(small_run) == key
    other = tmp_path / "w"   # the same pack folder with one held-out pair fewer: other data, another entry
    shutil.copytree(small_run.stage_dir("pack"), other / "pack")
    import pyarrow.parquet as pq
    m = pq.read_table(other / "pack" / "eval" / "manifest.parquet")
    pq.write_table(m.slice(1), other / "pack" / "eval" / "manifest.parquet")
    assert ev.teacher_eval_key(dataclasses.replace(small_run, workdir=str(other), dirs={})) != key


def test_the_teachers_evaluation_reads_the_features_it_computes_from_the_packed_samples(small_run):
    """The teacher's image and caption features as the embed stage packed them (float16) are what the teacher
    computes from the packed images and captions; a pair without a stored feature makes the model compute."""
    import kd.evaluate as ev

    from cidistill.core.runtime import embed_precision

    lm = dataclasses.replace(ev.load_for_eval(small_run, "teacher"),
                             precision=embed_precision(small_run.teacher.precision, "cpu"))
    lm.model.eval()  # computed in the precision the embed stage used
    root = small_run.stage_dir("pack")
    ec = dataclasses.replace(small_run.eval, batch_size=64)
    stored, computed = (ev.split_view(lm, root, "eval", ec, stored=s) for s in (True, False))
    assert stored.keys == computed.keys and len(stored.stored_txt) == len(stored.keys) and not computed.stored_txt
    assert any(stored.captions_zh) and (stored.img - computed.img).abs().max() < 2e-3
    for zh in (False, True):
        assert (stored.caption_features(lm, zh) - computed.caption_features(lm, zh)).abs().max() < 2e-3
    i = next(i for i, c in enumerate(stored.captions_zh) if c)
    stored.stored_txt_zh[i] = None
    assert torch.equal(stored.caption_features(lm, zh=True), computed.caption_features(lm, zh=True))


def test_the_evaluation_reads_its_labels_from_the_configured_columns_and_reports_what_it_skips(small_run):
    """A user's own label columns: zero-shot over the subgroup names with the generic prompts and a probe on
    the group. Without Chinese class names the ZH zero-shot is skipped; a class column the pairs lack skips
    zero-shot and the probe: each skip with its reason in the results and the summary, never a 0 %. Pairs
    without a value are left out of the task, and the results say on how many it ran."""
    import kd.evaluate as ev
    import pyarrow.parquet as pq

    from cidistill.core.config import EvalConfig
    from cidistill.core.packed import iter_tar_samples, sample_fields, split_shards
    from cidistill.core.store import Store
    from kd.stages import EvalStage

    pack = Store(small_run.stage_dir("pack"))
    meta = {s: [sample_fields(x)["meta"] for name, _ in split_shards(pack, s) for x in iter_tar_samples(pack, name)]
            for s in ("eval", "train")}
    assert len(meta["eval"]) == pq.read_metadata(pack.path("eval/manifest.parquet")).num_rows
    lm = ev.load_for_eval(small_run, "student")
    own = EvalConfig(tasks=["zeroshot", "linear_probe"], class_col="subgroup", probe_col="group", probe_max_iter=50)
    res, per = ev.evaluate(dataclasses.replace(small_run, eval=own), lm)
    subgroups = sorted({m["subgroup"] for split in meta.values() for m in split})
    assert res["zeroshot_classes"] == len(subgroups) > 5
    want = [subgroups.index(m["subgroup"]) for m in meta["eval"]]
    assert per["zeroshot_label"].tolist() == want and len(per["zeroshot_en"]) == len(want)
    assert "zeroshot_zh_top1" not in res and "class_name_zh_col" in res["skipped"]["zeroshot_zh"]
    assert 0 < res["probe_top1"] <= 1 and "linear_probe" not in res["skipped"]
    # pairs without a class (null or empty) are left out, not a reason to skip: the others score as before
    view = ev.split_view(lm, small_run.stage_dir("pack"), "eval", own)
    names = ev.class_names([view])
    for i in range(0, len(view.meta), 3):
        view.meta[i]["class"] = None if i % 2 else ""
    part_res, part_per = {}, {}
    ev.zeroshot(lm, view, names, own, part_res, part_per)
    rows = [i for i in range(len(view.meta)) if i % 3]
    assert part_per["zeroshot_rows"].tolist() == rows and part_per["zeroshot_label"].tolist() == [want[i] for i in rows]
    assert part_per["zeroshot_en"].tolist() == per["zeroshot_en"][rows].tolist()
    assert part_res["notes"]["zeroshot"] == f"on the {len(rows)} of {len(want)} images with a 'subgroup' value"
    two = {"a": ("apple", "apple"), "b": ("banana", "banana")}  # top-5 of two classes crashed (k out of range)
    for i, m in enumerate(view.meta):
        m["class"] = "ab"[i % 2]
    two_res = {}
    ev.zeroshot(lm, view, two, own, two_res, {})
    assert 0 <= two_res["zeroshot_en_top1"] <= 1 and "zeroshot_en_top5" not in two_res and "notes" not in two_res
    line = EvalStage.summary(None, {"student": dict(part_res, eval_images=len(want)), "held_out_split": True})
    assert f"zero-shot top-1 EN {100 * part_per['zeroshot_en'].mean():.1f}% (on the {len(rows)} of" in line

    with_zh = dataclasses.replace(own, class_col="base", class_name_col="base_name", class_name_zh_col="base_name_zh")
    res_zh, _ = ev.evaluate(dataclasses.replace(small_run, eval=with_zh), lm, tasks=["zeroshot"])
    assert "zeroshot_zh_top1" in res_zh and "skipped" not in res_zh

    absent = dataclasses.replace(own, class_col="label", probe_col="")
    res2, per2 = ev.evaluate(dataclasses.replace(small_run, eval=absent), lm)
    assert not any(k.startswith(("zeroshot_", "probe_")) for k in res2) and "zeroshot_en" not in per2
    assert "'label'" in res2["skipped"]["zeroshot"] and "'label'" in res2["skipped"]["linear_probe"]
    line = EvalStage.summary(None, {"student": res2, "held_out_split": True})
    assert "no task ran" in line and "skipped: zeroshot (" in line and "linear_probe (" in line


def test_a_label_column_of_lists_or_mappings_is_a_reported_skip_not_a_crash():
    """A carried list or struct column named as the class (it crashed with `unhashable type: 'list'`)."""
    from cidistill.core.config import EvalConfig
    from kd.evaluate import SplitView

    ec = EvalConfig(class_col="tags")
    view = SplitView(torch.empty(0), keys=["a", "b"], meta=[{"class": "x", "probe": "x"}, {"class": ["x"], "probe": ["x"]}])
    assert view.missing("class", ec) == "'tags' holds list values, not class labels (strings or numbers)"
    assert view.not_labels("probe", ec) and not SplitView(torch.empty(0), ["a"], meta=[{"class": 3}]).missing("class", ec)


def test_a_pair_without_a_caption_takes_no_part_in_retrieval_and_a_zero_score_makes_no_ratio(small_run):
    """A held-out pair with an empty or blank caption (embed counts it, balance keeps held-out pairs) was a
    query that could never be found: it is left out of that language's retrieval, with a note. And a student
    at 0 % EN zero-shot reported a ZH/EN ratio of 5e7: a ratio over a zero score is left out."""
    import kd.evaluate as ev
    from kd.stages import EvalStage, ratios

    lm = ev.load_for_eval(small_run, "student")
    lm.model.eval()  # as evaluate() runs it (dropout off)
    view = ev.split_view(lm, small_run.stage_dir("pack"), "eval", small_run.eval)
    n = len(view.keys)
    full, skipped = {}, {}
    ev.retrieval(lm, view, full, skipped)
    assert "notes" not in full and not skipped and full["retrieval_en"] == ev.recall_at(view.img, view.caption_features(lm))
    blank = list(range(0, n, 4))
    for i in blank:
        view.captions[i] = "" if i % 8 else "   "
    rows = [i for i in range(n) if i not in blank]
    part = {}
    ev.retrieval(lm, view, part, skipped)
    assert view.captioned().tolist() == rows and not skipped
    assert part["retrieval_en"] == ev.recall_at(view.img[rows], ev.text_features(lm, [view.captions[i] for i in rows]))
    assert part["notes"]["retrieval_en"] == f"on the {len(rows)} of {n} images with a caption"
    assert part["retrieval_zh"] == full["retrieval_zh"] and "retrieval_zh" not in part["notes"]  # ZH captions kept
    line = EvalStage.summary(None, {"student": dict(part, eval_images=n), "held_out_split": True})
    assert f"(on the {len(rows)} of {n} images with a caption)" in line
    # a pair without a Chinese caption takes no part in ZH retrieval (its English one stood in: English
    # retrieval scored as Chinese)
    view.captions_zh[1] = None
    view.captions_zh[2] = " "
    zh_rows = [i for i in range(n) if i not in (1, 2)]
    zh = {}
    ev.retrieval(lm, view, zh, skipped)
    assert view.captioned(zh=True).tolist() == zh_rows
    assert zh["notes"]["retrieval_zh"] == f"on the {n - 2} of {n} images with a Chinese caption"
    assert zh["retrieval_zh"] == ev.recall_at(view.img[zh_rows], view.caption_features(lm, True, zh_rows))
    view.captions[:] = [""] * n
    view.captions_zh[:] = [None] * n
    none = {}
    ev.retrieval(lm, view, none, skipped)
    assert "retrieval_en" not in none and skipped == {"retrieval_en": f"none of the {n} pairs has a caption"}
    view.captions_zh[:] = [""] * (n - 1) + ["一个"]
    ev.retrieval(lm, view, none, skipped)
    assert none["notes"]["retrieval_zh"] == f"on the 1 of {n} images with a Chinese caption"

    s = {"zeroshot_en_top1": 0.0, "zeroshot_zh_top1": 0.05, "params": 1, "image_throughput": 2}
    t = {"zeroshot_en_top1": 0.5, "params": 4, "image_throughput": 1}
    assert ratios(s, t) == {"zeroshot_en_retention": 0.0, "params_ratio": 0.25, "throughput_ratio": 2.0}
    assert "zeroshot_en_retention" not in ratios(t, dict(t, zeroshot_en_top1=0.0))
    assert ratios(dict(s, zeroshot_en_top1=0.1), t)["student_zh_over_en"] == 0.5
