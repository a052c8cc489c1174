"""The small demo end to end (the README's main job at test size), then checks on what each stage wrote."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cidistill.core.config import STAGES
from cidistill.core.store import Store


def test_every_stage_done_and_rerun_skips(small_run, capsys):
    for s in STAGES:
        assert Store(small_run.stage_dir(s)).exists("_DONE"), s
    from cidistill.app.registry import run_stages

    capsys.readouterr()
    run_stages(small_run, ["download", "embed", "balance", "cluster", "pack", "train", "eval", "export"])
    out = capsys.readouterr().out
    assert out.count("already done") == 8


def test_embeddings_equal_direct_model_calls(small_run):
    """The stage's float16 parquet equals calling the teacher directly on the same images and captions (in the
    precision the stage ran it in)."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from cidistill.core.images import decode_rgb, read_tar_images
    from cidistill.core.models import autocast, channels_last, create
    from cidistill.core.runtime import embed_precision

    lm = create(small_run.teacher.model, small_run.teacher.pretrained)
    channels_last(lm.model).eval()  # as the stage runs it
    dl = Store(small_run.stage_dir("download"))
    t = pq.read_table(Path(small_run.stage_dir("embed")) / "00000.parquet")
    d = pq.read_table(Path(small_run.stage_dir("download")) / "00000.parquet").to_pandas().set_index("key")
    raw = read_tar_images(dl, "00000.tar")
    keys = t.column("key").to_pylist()[:16]
    with torch.no_grad(), autocast(embed_precision(small_run.teacher.precision, "cpu"), "cpu"):
        img = F.normalize(lm.model.encode_image(torch.stack(
            [lm.preprocess_val(Image.fromarray(decode_rgb(raw[k], 0))) for k in keys])), dim=-1)
        en = F.normalize(lm.model.encode_text(lm.tokenizer([d.loc[k, "caption"] for k in keys])), dim=-1)
        zh = F.normalize(lm.model.encode_text(lm.tokenizer([d.loc[k, "caption_zh"] for k in keys])), dim=-1)
    for col, want in (("image_emb", img), ("text_emb", en), ("text_emb_zh", zh)):
        got = np.array(t.column(col).to_pylist()[:16], dtype=np.float32)
        assert np.abs(got - want.float().numpy()).max() < 2e-3, col
    assert all(d.loc[k, "caption_zh"] for k in keys)  # Chinese captions were present and embedded


def test_repeated_captions_in_a_batch_are_embedded_once(small_run):
    from cidistill.core.images import read_tar_images
    from pipeline.embed import TeacherEmbedder

    emb = TeacherEmbedder(vars(small_run.teacher))
    img = next(iter(read_tar_images(Store(small_run.stage_dir("download")), "00000.tar").values()))
    prep = emb.prepare(emb.decoded([img] * 4, ["a red heart", "a dog face", "a red heart", " "], ["红心"] * 4))
    idx, inv, tok = prep["tokens"]["text_emb"]
    assert idx == [0, 1, 2] and len(tok) == 2 and inv.tolist() == [1, 0, 1]   # two distinct captions run
    assert len(prep["tokens"]["text_emb_zh"][2]) == 1
    out = emb.forward(prep)
    alone = emb.embed([img], ["a dog face"], ["红心"])                    # each caption on its own
    assert np.array_equal(out["text_emb"][0], out["text_emb"][2]) and np.isnan(out["text_emb"][3]).all()
    assert np.abs(out["text_emb"][1] - alone["text_emb"][0]).max() < 1e-4
    assert np.abs(out["text_emb_zh"] - alone["text_emb_zh"][0]).max() < 1e-4


def test_half_finished_embed_of_another_teacher_is_redone_not_mixed(small_run, tmp_path, capsys):
    """A folder half-embedded by one teacher, rerun with another: the config change is named, the old shards are
    cleared and every shard is the new teacher's (before fingerprints it was a width error, or worse a mix)."""
    import dataclasses
    import shutil

    from pipeline.embed import EmbedStage

    cfg = dataclasses.replace(small_run, dirs={"embed": str(tmp_path / "embed"), "download": small_run.stage_dir("download")})
    shutil.copytree(small_run.stage_dir("embed"), tmp_path / "embed")
    for p in (tmp_path / "embed").glob("00001*"):
        p.unlink()
    (tmp_path / "embed" / "_DONE").unlink()
    cfg.teacher = dataclasses.replace(cfg.teacher, model="cid-wide-test", pretrained="random",
                                      model_config=str(_wide_config(tmp_path)))  # 512-d vs the demo's 384-d
    stage = EmbedStage(cfg, use_ray=False)
    state, why = stage.status(stage.fingerprint())
    assert state == "changed" and "teacher.model" in why and "cid-wide-test" in why
    stats = stage.run()
    widths = {pq.read_schema(p).field("image_emb").type.list_size for p in (tmp_path / "embed").glob("0*.parquet")}
    assert widths == {512} and stats["shards_resumed"] == 0


def _wide_config(tmp_path):
    p = tmp_path / "cid-wide-test.json"
    p.write_text(json.dumps({"embed_dim": 512, "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16,
                                                                "patch_size": None},
                             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}))
    return p


def test_balance_and_cluster_outputs_cover_every_sample(small_run):
    emb_keys = {k for p in Path(small_run.stage_dir("embed")).glob("0*.parquet") for k in pq.read_table(p).column("key").to_pylist()}
    bal = [pq.read_table(p) for p in sorted(Path(small_run.stage_dir("balance")).glob("0*.parquet"))]
    keys = [k for t in bal for k in t.column("key").to_pylist()]
    assert sorted(keys) == sorted(emb_keys)
    kept = {k for t in bal for k, kp in zip(t.column("key").to_pylist(), t.column("kept").to_pylist()) if kp}
    dropped = {k: d for t in bal for k, kp, d in zip(t.column("key").to_pylist(), t.column("kept").to_pylist(),
                                                      t.column("dup_of").to_pylist()) if not kp}
    assert all(d in kept for d in dropped.values() if d)  # dup_of always names a kept sample
    stats = json.loads((Path(small_run.stage_dir("balance")) / "stats.json").read_text())
    assert stats["kept"] == len(kept) and stats["removed"] == len(dropped)
    assert sum(stats["removed_by_rule"].values()) + stats["held_out"] == len(dropped)
    # the held-out evaluation style is exactly the held_out rows, and none of it is kept or trained on
    reasons = {k: r for t in bal for k, r in zip(t.column("key").to_pylist(), t.column("drop_reason").to_pylist())}
    dl = pa.concat_tables([pq.read_table(p, columns=["key", "vendor", "status"])
                           for p in Path(small_run.stage_dir("download")).glob("0*.parquet")]).to_pylist()
    twitter = {r["key"] for r in dl if r["status"] == "success" and r["vendor"] == "twitter"}
    assert twitter and {k for k, r in reasons.items() if r == "held_out"} == twitter
    clu = {k for p in Path(small_run.stage_dir("cluster")).glob("0*.parquet") for k in pq.read_table(p).column("key").to_pylist()}
    assert clu == kept
    cent = np.load(Path(small_run.stage_dir("cluster")) / "centroids.npy")
    assert cent.shape[0] == small_run.cluster.k


def _embed_with_open_clip_alone(folder: Path, tmp_path: Path, texts: list[str], moved: bool = False):
    """Image and text embeddings of the export in `folder`, computed by a fresh process that imports only
    open_clip; a moved folder is loaded as its model card says (text_cfg's `hf_model_name` given as an argument)."""
    code = f"""
import sys, json, numpy as np, torch
from cidistill.core.runtime import fix_torchvision; fix_torchvision()   # CPU torch + CUDA torchvision on this box only
import open_clip
assert not {{'kd', 'pipeline', 'cidistill.app', 'cidistill.core.models'}} & set(sys.modules)
path = '{folder}'
kw = {{}}
if {moved}:
    text_cfg = json.load(open(path + '/open_clip_config.json'))['model_cfg']['text_cfg']
    kw = {{'text_cfg': dict(text_cfg, hf_model_name=path)}}
m, _, pre = open_clip.create_model_and_transforms('local-dir:' + path, **kw)
tok = open_clip.get_tokenizer('local-dir:' + path)
m.eval()
with torch.no_grad():
    i = m.encode_image(torch.from_numpy(np.load('{tmp_path / "images.npy"}'))).numpy()
    t = m.encode_text(tok({texts!r})).numpy()
np.save('{tmp_path / "got_i.npy"}', i); np.save('{tmp_path / "got_t.npy"}', t)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
    return np.load(tmp_path / "got_i.npy"), np.load(tmp_path / "got_t.npy")


def _trainer_embeddings(small_run, tmp_path: Path, texts: list[str]):
    import torch

    from kd.export import load_trained_student

    lm = load_trained_student(small_run)
    lm.model.eval()
    images = torch.rand(3, 3, 64, 64)
    np.save(tmp_path / "images.npy", images.numpy())
    with torch.no_grad():
        return lm, lm.model.encode_image(images).numpy(), lm.model.encode_text(lm.tokenizer(texts)).numpy()


def test_exported_student_loads_with_open_clip_alone(small_run, tmp_path):
    """A fresh process that imports only open_clip reproduces the trainer's embeddings."""
    texts = ["grinning face", "笑脸", "red heart"]
    _, want_i, want_t = _trainer_embeddings(small_run, tmp_path, texts)
    got_i, got_t = _embed_with_open_clip_alone(Path(small_run.stage_dir("export")) / "student", tmp_path, texts)
    assert np.abs(got_i - want_i).max() < 1e-4
    assert np.abs(got_t - want_t).max() < 1e-4


def test_exported_student_loads_after_being_moved(small_run, tmp_path):
    """An export copied elsewhere, its original folder deleted, still loads and gives the trainer's embeddings:
    with cidistill's loader as it is (it reads the Hugging Face tower's config from the folder it lies in), and
    with open_clip alone given the new path as its model card shows."""
    import shutil

    import torch

    from cidistill.core.models import create
    from kd.export import export_local_dir, model_card

    texts = ["grinning face", "笑脸"]
    lm, want_i, want_t = _trainer_embeddings(small_run, tmp_path, texts)
    export_local_dir(lm, tmp_path / "orig", readme=model_card("student", lm, {}))
    text_cfg = json.loads((tmp_path / "orig" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    # no path outside the folder: its tokenizer was named by the train stage's folder, where it was cut
    assert text_cfg["hf_model_name"] == text_cfg["hf_tokenizer_name"] == str(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "elsewhere" / "moved")
    shutil.rmtree(tmp_path / "orig")
    folder = tmp_path / "elsewhere" / "moved"
    assert "hf_model_name=path" in (folder / "README.md").read_text()
    moved = create(f"local-dir:{folder}")
    moved.model.eval()
    with torch.no_grad():
        got = moved.model.encode_text(moved.tokenizer(texts)).numpy()
    assert np.abs(got - want_t).max() < 1e-5
    got_i, got_t = _embed_with_open_clip_alone(folder, tmp_path, texts, moved=True)
    assert np.abs(got_i - want_i).max() < 1e-4 and np.abs(got_t - want_t).max() < 1e-4
    # as a teacher (a moved cache's demo teacher): the student's text tower is cut from the folder where it lies
    from cidistill.core.models import configs_of
    from kd.text_tower import build_student_text_tower

    assert configs_of(f"local-dir:{folder}")[0]["text_cfg"]["hf_model_name"] == str(folder.resolve())
    text_cfg, init = build_student_text_tower(moved.model_cfg, moved.model.state_dict(), texts, 1, tmp_path / "tower")
    assert (tmp_path / "tower" / "config.json").is_file() and any(k.startswith("text.") for k in init)


def test_onnx_encoders_match_torch(small_run, tmp_path):
    """The optional edge export: image and text encoders in ONNX give torch's embeddings in onnxruntime,
    without the tracer's warnings on the console."""
    import warnings

    from kd.export import export_onnx, load_trained_student

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diffs = export_onnx(load_trained_student(small_run), tmp_path)
    assert not caught, [str(w.message)[:120] for w in caught]
    assert set(diffs) == {"image", "text"} and (tmp_path / "image_encoder.onnx").exists()
    assert max(diffs.values()) < 1e-4, diffs


def test_card_html_self_contained_and_numbers_match(small_run):
    import base64
    import io
    import re

    from PIL import Image

    card = Path(small_run.stage_dir("card"))
    html = (card / "card.html").read_text()
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', html)
    assert len(srcs) >= 6
    for s in srcs:
        assert s.startswith("data:image/png;base64,")
        Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    md = (card / "card.md").read_text()
    bal = json.loads((Path(small_run.stage_dir("balance")) / "stats.json").read_text())
    dl = json.loads((Path(small_run.stage_dir("download")) / "stats.json").read_text())
    assert f"| kept | {bal['kept']:,} |" in md and f"| downloaded | {dl['successes']:,} |" in md
    for rule, n in bal["removed_by_rule"].items():
        assert f"| {rule} | {n:,} |" in md
    assert "near_dup" in md and "Lineage" in md
    # the card describes the curated data only: nothing of the training it does not follow (it would go stale)
    assert "- pack: finished" in md and "- train: finished" not in md and '"student"' not in md


def test_lineage_why(small_run):
    from data_cards.collect import why

    bal = pq.read_table(Path(small_run.stage_dir("balance")) / "00000.parquet")
    dropped = [r for r in bal.to_pylist() if not r["kept"]]
    r = why(small_run, dropped[0]["key"])
    assert r["drop_reason"] == dropped[0]["drop_reason"] and r["dup_of"] == dropped[0]["dup_of"] and r["caption"]
