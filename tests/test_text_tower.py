"""A student text tower cut from the demo teacher's MiniLM: corpus vocabulary with Chinese characters, the
teacher's weights carried over exactly."""
import json

import pytest
import torch

from cidistill.core.models import DEMO_TEACHER, create
from cidistill.core.text_ops import encode_text
from kd.text_tower import build_student_text_tower

CORPUS = ["grinning face: smile, happy", "red heart: love", "笑脸: 开心，微笑", "红心: 爱", "瀑布的表情"]


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return create(DEMO_TEACHER)


def student_from(teacher, layers, folder):
    text_cfg, init = build_student_text_tower(teacher.model_cfg, teacher.model.state_dict(), CORPUS, layers, folder)
    cfg = dict(teacher.model_cfg, text_cfg=text_cfg)
    path = folder.parent / f"student-l{layers}.json"
    path.write_text(json.dumps(cfg))
    lm = create(path.stem, model_config=str(path))
    missing, unexpected = lm.model.load_state_dict(init, strict=False)
    assert not unexpected and not [k for k in missing if k.startswith("text.")]
    return lm


def test_full_depth_cut_equals_teacher_on_corpus_text(teacher, tmp_path):
    """All layers kept: only the vocabulary changed, so English text whose pieces the cut vocabulary has
    (corpus text, common words) embeds exactly as the teacher's; other words are spelled, never [UNK]."""
    lm = student_from(teacher, 6, tmp_path / "tower6")
    en = CORPUS[:2] + ["a picture of the red heart.", "smile"]
    hf_t, hf_s = teacher.tokenizer.tokenizer, lm.tokenizer.tokenizer
    assert all(set(hf_t.tokenize(t)) <= set(hf_s.vocab) for t in en)
    with torch.no_grad():
        want = encode_text(teacher.model.eval(), teacher.tokenizer(en))
        got = encode_text(lm.model.eval(), lm.tokenizer(en))
    assert torch.allclose(got, want, atol=1e-5)
    assert hf_s.unk_token not in hf_s.tokenize("a zyxquorp emoji of quokkas")


def test_chinese_characters_get_their_own_tokens(teacher, tmp_path):
    lm = student_from(teacher, 3, tmp_path / "tower3")
    unk_t = teacher.tokenizer.tokenizer.unk_token_id
    unk_s = lm.tokenizer.tokenizer.unk_token_id
    zh = CORPUS[2:]
    assert (teacher.tokenizer(zh) == unk_t).sum() > 0          # MiniLM lacks some of these characters
    assert (lm.tokenizer(zh) == unk_s).sum() == 0               # the student's vocabulary has them all
    assert lm.tokenizer.tokenizer.tokenize("瀑布") == ["瀑", "布"]  # one token per character
    layers = json.loads((tmp_path / "tower3" / "teacher_layers.json").read_text())["layers"]
    assert layers == [0, 2, 5]
    assert len(lm.tokenizer.tokenizer.vocab) < len(teacher.tokenizer.tokenizer.vocab) / 4
    assert sum(p.numel() for p in lm.model.text.parameters()) < sum(p.numel() for p in teacher.model.text.parameters()) / 3


def test_teacher_without_an_hf_text_tower_is_a_clear_error(teacher, tmp_path):
    from cidistill.core.models import ModelLoadError

    clip_like = {"embed_dim": 512, "text_cfg": {"width": 512, "layers": 12, "context_length": 77}}
    with pytest.raises(ModelLoadError, match="text_from_teacher needs a teacher whose text tower"):
        build_student_text_tower(clip_like, {}, CORPUS, 3, tmp_path / "t")
    with pytest.raises(ModelLoadError, match="has 6 layers"):
        build_student_text_tower(teacher.model_cfg, teacher.model.state_dict(), CORPUS, 7, tmp_path / "t7")


def test_loader_tokenizer_gives_the_open_clip_wrappers_ids(teacher, tmp_path):
    """The loader's tokenizer (the Rust tokenizer called directly, ftfy skipped for plain text) gives exactly
    the ids of open_clip's wrapper, for the cut student's and the teacher's vocabularies, on captions that
    need cleaning (HTML entities, mojibake, control characters, full-width forms, tabs) and ones too long."""
    import random

    from kd.stream import BackendTokenizer

    pieces = list("abcXYZ09 ;#<>\t\n\r") + ["&amp;", "&lt;b&gt;", "é", "中文", "😀", "\x00", "\x1b[31m", "’", "“",
                                            "ﬁ", "Ａ", "Ã©", "&#39;", "\u00a0", "grinning face, ", "红心", "，", "。",
                                            "、", "＆amp;", "（", "）", "：", "“", "ｗ", "ｲ"]
    rnd = random.Random(0)
    texts = CORPUS + ["", " ", "word " * 100] + ["".join(rnd.choice(pieces) for _ in range(rnd.randrange(40)))
                                                  for _ in range(1000)]
    plain = pieces[-12:] + ["a", "Z", " ", "<", ";", "$", "\\", "瀑"]  # the fast path's characters, mostly
    texts += ["".join(rnd.choice(plain) for _ in range(rnd.randrange(30))) for _ in range(2000)]
    for tok in (student_from(teacher, 3, tmp_path / "tower3").tokenizer, teacher.tokenizer):
        fast = BackendTokenizer.of(tok)
        assert isinstance(fast, BackendTokenizer)
        assert torch.equal(fast(texts), tok(texts))
