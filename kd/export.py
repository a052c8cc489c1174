"""export: open_clip `local-dir` folders (open_clip_config.json + open_clip_model.safetensors + README.md)
that `open_clip.create_model_and_transforms("local-dir:PATH")` loads with open_clip alone; optional ONNX."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from importlib.util import find_spec
from pathlib import Path

import torch

from cidistill.core.config import Config
from cidistill.core.errors import StageError
from cidistill.core.models import LoadedModel, count_params, create
from cidistill.core.text_ops import state_dict_for_export
from cidistill.core.store import Store, absolute
from .text_tower import ARCH, load_arch


def export_local_dir(lm: LoadedModel, out: str | Path, readme: str = "", onnx: bool = False) -> dict:
    """Build the folder locally, then publish it at `out` (a local path or a URI) through the store: a local
    folder appears whole (renamed into place); on an object store open_clip_config.json is written last.
    With `onnx`, the encoders go in too; returns their largest differences from torch."""
    from safetensors.torch import save_file

    out = absolute(str(out))
    diffs: dict = {}
    with tempfile.TemporaryDirectory(prefix="cidistill-export-") as tmp_dir:
        tmp = Path(tmp_dir)
        model_cfg = json.loads(json.dumps(lm.model_cfg))
        text = model_cfg.get("text_cfg", {})
        if text.get("hf_tokenizer_name"):
            # open_clip reads an HF tokenizer of a local-dir model from the folder itself
            src = Path(text["hf_tokenizer_name"])
            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
                if (src / f).exists():
                    shutil.copyfile(src / f, tmp / f)
            text["hf_model_pretrained"] = False  # weights come from the safetensors file
            text["hf_tokenizer_name"] = out  # the folder's own copy (it named the train stage's folder)
        hf_model = Path(text.get("hf_model_name") or "")
        if text.get("hf_model_name") and (hf_model / "config.json").exists():
            # the HF tower's architecture travels with the folder; open_clip reads it from hf_model_name,
            # which must be a path: the folder's final one (cidistill loads a moved folder as it is; plain
            # open_clip is given the new path, as the model card shows)
            shutil.copyfile(hf_model / "config.json", tmp / "config.json")
            text["hf_model_name"] = out
        cfg = {"model_cfg": model_cfg, "preprocess_cfg": _jsonable(lm.preprocess_cfg)}
        (tmp / "open_clip_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False), encoding="utf-8")
        vocab = lm.model_cfg.get("text_cfg", {}).get("vocab_size", 49408)
        save_file(state_dict_for_export(lm.model, vocab), str(tmp / "open_clip_model.safetensors"))
        (tmp / "README.md").write_text(readme or f"# {out.rsplit('/', 1)[-1]}\n\nopen_clip model exported by cidistill.\n", encoding="utf-8")
        if onnx:
            diffs = export_onnx(lm, tmp)
        parent, name = out.rstrip("/").rsplit("/", 1)
        Store(parent).put_folder(tmp, name, last="open_clip_config.json")
    return diffs


def _jsonable(d: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def load_trained_student(cfg: Config) -> LoadedModel:
    """The train stage's final weights (trimmed vocabulary expanded) in a plain open_clip model."""
    train = Store(cfg.stage_dir("train"), create=False)
    if not train.exists("model.safetensors"):
        raise StageError(f"no trained student in {train.uri}: run the train stage first")
    meta = train.read_json("student.json")
    model_config = meta.get("model_config", "")
    if model_config.startswith(f"{ARCH}/"):  # a text tower cut from the teacher, saved beside the weights
        model_config = load_arch(train, model_config)
    return create(meta["model"], str(train.local_copy("model.safetensors")), model_config,
                  context_length=meta.get("context_length"))


def check_onnx_installed() -> None:
    """export.onnx needs the `onnx` extra; without it a run failed at its very end, after the training."""
    missing = [m for m in ("onnx", "onnxruntime") if find_spec(m) is None]
    if missing:
        from cidistill.core.config import ConfigError

        raise ConfigError(f"export.onnx needs {' and '.join(missing)}, not installed: pip install -c constraints.txt "
                          "'.[onnx]' in the checkout (or set export.onnx: false)")


def export_onnx(lm: LoadedModel, out: Path) -> dict:
    """Image and text encoders as ONNX, checked with onnxruntime against torch."""
    import numpy as np
    import onnxruntime as ort

    model = lm.model.eval()
    size = lm.model_cfg["vision_cfg"]["image_size"]
    # traced with a batch of 2, checked on a batch of 3: the batch axis must really be dynamic
    img, img_check = torch.randn(2, 3, size, size), torch.randn(3, 3, size, size)
    txt, txt_check = lm.tokenizer(["a smiling face", "一只猫"]), lm.tokenizer(["red heart", "笑脸", "a cat face, animal"])

    class Encoder(torch.nn.Module):
        """The model as a submodule (its weights become ONNX initialisers). Kept in eval mode: the exporter
        restores the wrapper's mode afterwards, which a fresh module's train mode would push into BatchNorm."""
        def __init__(self, fn: str):
            super().__init__()
            self.model, self.fn = model, fn

        def forward(self, x):
            return getattr(self.model, self.fn)(x, normalize=True)

    diffs = {}
    for name, mod, x, check in (("image", Encoder("encode_image").eval(), img, img_check),
                                ("text", Encoder("encode_text").eval(), txt, txt_check)):
        path = out / f"{name}_encoder.onnx"
        with warnings.catch_warnings():
            if not os.environ.get("CIDISTILL_VERBOSE"):  # the tracer's notes: the check below is what counts
                warnings.simplefilter("ignore")
            torch.onnx.export(mod, (x,), str(path), input_names=["input"], output_names=["embedding"],
                              dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=17,
                              dynamo=False)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input": check.numpy()})[0]
        with torch.no_grad():
            want = mod(check).numpy()
        diffs[name] = float(np.abs(got - want).max())
    return diffs


def model_card(title: str, lm: LoadedModel, facts: dict) -> str:
    lines = [f"# {title}", "", "An open_clip model exported by cidistill. Load it with open_clip alone:", "",
             "```python", "import open_clip",
             "model, _, preprocess = open_clip.create_model_and_transforms('local-dir:PATH')",
             "tokenizer = open_clip.get_tokenizer('local-dir:PATH')", "```", ""]
    if lm.model_cfg.get("text_cfg", {}).get("hf_model_name"):
        lines += ["The text tower is a Hugging Face model whose `config.json` is in this folder, but open_clip reads",
                  "it from `text_cfg.hf_model_name`, the path the folder was exported to. A copy elsewhere loads",
                  "with its own path given (or with `cidistill.core.models.create('local-dir:PATH')` as it is):", "",
                  "```python", "import json, open_clip", "path = 'PATH'",
                  "text_cfg = json.load(open(f'{path}/open_clip_config.json'))['model_cfg']['text_cfg']",
                  "model, _, preprocess = open_clip.create_model_and_transforms(",
                  "    f'local-dir:{path}', text_cfg=dict(text_cfg, hf_model_name=path))", "```", ""]
    lines += [f"- parameters: {count_params(lm.model):,}"]
    lines += [f"- {k}: {v}" for k, v in facts.items()]
    return "\n".join(lines) + "\n"
