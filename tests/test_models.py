"""The padding-free text path gives open_clip's own encode_text, values and gradients, for captions of
very different lengths, on the full and on a trimmed vocabulary."""
import torch

from cidistill.core.models import create
from cidistill.core.text_ops import encode_text, trim_vocab

CAPTIONS = ["cat", "crying cat, animal, face, sad", "哭泣的猫，哭泣的猫脸，泪，猫脸", "a", "love-you gesture: light skin tone, "
            "fingers, hand, ILY, and a much longer tail of words to fill the context"]


def _grads(model, fn):
    model.zero_grad()
    fn().pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_encode_text_equals_open_clip():
    torch.manual_seed(0)
    lm = create("cid-tiny-rn", context_length=64)
    model, tok = lm.model, lm.tokenizer(CAPTIONS)
    assert int(tok.argmax(1).max()) + 1 < tok.shape[1]  # there is padding to skip
    for trimmed in (False, True):
        tokens = trim_vocab(model, tok)[tok] if trimmed else tok
        want, got = model.encode_text(tokens), encode_text(model, tokens, chunks=3)
        assert torch.allclose(want, got, atol=1e-5)
        g_want = _grads(model, lambda: model.encode_text(tokens))
        g_got = _grads(model, lambda: encode_text(model, tokens, chunks=3))
        assert g_want.keys() == g_got.keys()
        for name in g_want:
            scale = float(g_want[name].abs().max()) + 1e-12  # fp32 sums in another order: relative to the largest
            assert float((g_want[name] - g_got[name]).abs().max()) <= 1e-5 * scale, name


def test_encode_text_equals_hf_tower():
    """HF towers (the demo teacher's MiniLM): rows sorted by length and cut per group give the tower's own
    padded-batch output and gradients, for Chinese and English captions of very different lengths."""
    from cidistill.core.models import DEMO_TEACHER
    from cidistill.core.text_ops import token_lengths

    torch.manual_seed(0)
    lm = create(DEMO_TEACHER)
    model, tok = lm.model.eval(), lm.tokenizer(CAPTIONS)
    lengths = token_lengths(model, tok)
    assert int(lengths.min()) < int(lengths.max()) < tok.shape[1]  # groups get cut to different widths
    want, got = model.encode_text(tok), encode_text(model, tok, chunks=3)
    assert torch.allclose(want, got, atol=1e-5)
    g_want = _grads(model, lambda: model.encode_text(tok))
    g_got = _grads(model, lambda: encode_text(model, tok, chunks=3))
    assert g_want.keys() == g_got.keys() and g_want
    # relative to the largest gradient anywhere: a key bias's gradient is zero up to rounding (softmax
    # ignores it), so its own scale would measure noise
    scale = max(float(g.abs().max()) for g in g_want.values())
    for name in g_want:
        assert float((g_want[name] - g_got[name]).abs().max()) <= 1e-5 * scale, name


def test_a_model_config_file_given_again_wins_over_one_given_since(tmp_path):
    """open_clip holds one config per name: after a file B under the same name as an earlier file A, creating
    from A must build A's model, not B's (one process training the students of two runs, A, B, then A again)."""
    import json

    from cidistill.core.models import CONFIG_DIR

    base = json.loads((CONFIG_DIR / "cid-tiny-rn.json").read_text())
    files = {}
    for dim in (32, 48):
        (tmp_path / str(dim)).mkdir()
        files[dim] = tmp_path / str(dim) / "cid-arch-under-test.json"
        files[dim].write_text(json.dumps(dict(base, embed_dim=dim)))
    for dim in (32, 48, 32):
        lm = create("cid-arch-under-test", model_config=str(files[dim]))
        assert lm.model.text_projection.shape[-1] == dim
