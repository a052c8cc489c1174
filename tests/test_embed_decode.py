"""The embed stage's decode tasks: they build the teacher's preprocessing from configs alone (no weights), ship
uint8 pixels, and the actor finishes ToTensor + Normalize. The result must be the teacher's own transform, bit
for bit, for every way a teacher is named."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cidistill.core.images import decode_rgb
from cidistill.core.models import create, val_preprocess_cfg
from pipeline.embed import TeacherEmbedder, _steps, decode_batch, val_transform
from cidistill.core.errors import StageError


def _image(w: int, h: int, fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, fmt)
    return buf.getvalue()


def _custom_config(tmp_path):
    p = tmp_path / "cid-odd-size-test.json"
    p.write_text(json.dumps({"embed_dim": 32, "vision_cfg": {"image_size": 40, "layers": [1, 1, 1, 1], "width": 16,
                                                               "patch_size": None},
                             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}))
    return str(p)


def _teachers(small_run, tmp_path):
    demo_dir = small_run.teacher.pretrained            # the demo teacher as a local-dir: folder
    return [("ViT-B-32", "", ""), (small_run.teacher.model, demo_dir, ""),
            (small_run.teacher.model, demo_dir[len("local-dir:"):] + "/open_clip_model.safetensors", ""),
            ("cid-odd-size-test", "", _custom_config(tmp_path))]


def test_preprocess_from_configs_is_the_teachers_own(small_run, tmp_path):
    for name, pretrained, model_config in _teachers(small_run, tmp_path):
        lm = create(name, pretrained, model_config)
        assert val_transform(val_preprocess_cfg(name, pretrained, model_config))[4] == _steps(lm.preprocess_val), name
    # a pretrained tag's own settings are merged without fetching anything (SigLIP squashes, mean 0.5)
    siglip = val_preprocess_cfg("ViT-B-16-SigLIP", "webli")
    assert siglip["resize_mode"] == "squash" and tuple(siglip["mean"]) == (0.5, 0.5, 0.5)
    assert val_transform(siglip)[3] == (224, 224, 3)


def test_decoded_uint8_pixels_give_the_transforms_exact_input(small_run, tmp_path):
    images = [_image(100, 70, "JPEG", 0), _image(31, 57, "PNG", 1), b"not an image", _image(64, 64, "PNG", 2)]
    for name, pretrained, model_config in _teachers(small_run, tmp_path)[1:]:
        teacher = dict(vars(small_run.teacher), model=name, pretrained=pretrained, model_config=model_config)
        emb = TeacherEmbedder(teacher, pp=val_preprocess_cfg(name, pretrained, model_config))
        batch = decode_batch({"image": images, "key": ["a", "b", "c", "d"]}, emb.pp)
        assert batch["ok"].tolist() == [True, True, False, True] and batch["pixels"].dtype == np.uint8
        assert batch["error"][2].startswith("undecodable") and batch["key"] == ["a", "b", "c", "d"]
        assert "image" not in batch and batch["image_hash"][0] != batch["image_hash"][1]
        want = torch.stack([emb.lm.preprocess_val(Image.fromarray(decode_rgb(b, 0))) for b in images if b != b"not an image"])
        assert torch.equal(emb.pixels_to_input(batch["pixels"][batch["ok"]]), want), name


def test_preprocess_that_differs_from_the_teachers_is_a_clear_error(small_run):
    t = small_run.teacher
    pp = val_preprocess_cfg(t.model, t.pretrained)
    with pytest.raises(StageError, match="preprocess"):
        TeacherEmbedder(vars(t), pp=dict(pp, size=pp["size"] * 2))
    with pytest.raises(StageError, match="preprocess"):
        TeacherEmbedder(vars(t), pp=dict(pp, mean=(0.5, 0.5, 0.5)))
