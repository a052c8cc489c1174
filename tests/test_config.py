import functools
import re

import pytest

from cidistill.core.config import ConfigError, load_config


def test_defaults_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("workdir: runs/x\ntrain: {batch_size: 32}\nbalance: {semantic_eps: [0.05, 0.1], apply_eps: 0.1}\n")
    cfg = load_config(str(p), ["train.batch_size=64", "cluster.k=5"])
    assert cfg.train.batch_size == 64 and cfg.cluster.k == 5 and cfg.workdir == "runs/x"
    assert cfg.stage_dir("embed").endswith("runs/x/embed")
    assert cfg.balance.semantic_eps == [0.05, 0.1]


def test_a_local_dir_teacher_model_is_its_own_weights():
    """`teacher.model: local-dir:PATH` alone (its folder holds the weights): embed refused it as "teacher.pretrained
    is empty", and eval and export left the teacher out."""
    cfg = load_config(None, ["teacher.model=local-dir:/models/t"])
    assert cfg.teacher.pretrained == "local-dir:/models/t"
    with pytest.raises(ConfigError, match="'x.pt' would be ignored: teacher.model 'local-dir:/t' holds its own"):
        load_config(None, ["teacher.model=local-dir:/t", "teacher.pretrained=x.pt"])


def test_override_a_list_item_by_index(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train: {phases: [{steps: 5, losses: {feature_distill: 1.0}}, {steps: 7, losses: {align: 1.0}}]}\n")
    cfg = load_config(str(p), ["train.phases.1.steps=450", "train.phases.0.losses={instance: 1.0}"])
    assert [(ph.steps, ph.losses) for ph in cfg.train.phases] == [(5, {"feature_distill": 1.0, "instance": 1.0}),
                                                                (450, {"align": 1.0})]
    with pytest.raises(ConfigError, match="train.phases.2"):
        load_config(str(p), ["train.phases.2.steps=3"])
    # a list set by one override and an item of it by the next (an AttributeError traceback before)
    cfg = load_config(str(p), ["train.phases=[{steps: 3, losses: {clip: 1.0}}]", "train.phases.0.steps=4"])
    assert [(ph.steps, ph.losses) for ph in cfg.train.phases] == [(4, {"clip": 1.0})]
    with pytest.raises(ConfigError, match=r"override 'train.phases.1.steps': '1' is not an index of the list set before it"):
        load_config(str(p), ["train.phases=[{steps: 3}]", "train.phases.1.steps=4"])
    with pytest.raises(ConfigError, match=r"override 'train.lr.x': an earlier override set a value there, not a section"):
        load_config(str(p), ["train.lr=0.1", "train.lr.x=1"])
    for bad in ("=3", ".lr=3", "train..lr=3", "train.=3"):  # "unknown config key(s): " naming nothing before
        with pytest.raises(ConfigError, match=rf"^override '{re.escape(bad)}': expected key=value with a key such as "):
            load_config(str(p), [bad])


@pytest.mark.parametrize("text,needle", [
    ("trian: {batch_size: 3}\n", "trian"),
    ("train: {batch_sise: 3}\n", "train.batch_sise"),
    ("train: {batch_size: many}\n", "train.batch_size"),
    ("balance: {semantic_eps: 0.1}\n", "balance.semantic_eps"),
    ("train: {phases: [{steps: 3, losses: {clip: 1.0, clop: 1.0}}]}\n", "clop"),
    ("balance: {keep: medium}\n", "balance.keep"),
    ("stages: [download, paint]\n", "paint"),
    # a URL-list column named like one the stages write would be overwritten or doubled on the way
    ("data: {extra_cols: [vendor, status, cluster_id]}\n", r"data.extra_cols: \['cluster_id', 'status'\] would clash"),
    ("data: {url_col: link, extra_cols: [url]}\n", r"\['url'\] would clash"),
    ("data: {extra_cols: [vendor, vendor]}\n", "listed twice"),
    ("data: {holdout: vendor=twitter}\n", "'vendor' must be carried"),
    # every image is resized to image_size: 22400 (for 224) asked for 1.5 GB an image, 16 threads at once
    ("data: {image_size: 22400}\n", r"data.image_size: 22400 px a side is 501,760,000 pixels an image, above "
                                     r"data.max_image_pixels \(89,478,485\)"),
    ("eval: {tasks: [retrieval, probe]}\n", r"eval.tasks: unknown task\(s\) \['probe'\]"),
    ("eval: {templates_en: [a photo]}\n", "eval.templates_en: each template needs one {}"),
    # each failed only in the evaluation, after the whole training (KeyError, ValueError), or left the name out
    ("eval: {templates_en: ['a {x} of {}']}\n", r"eval.templates_en: each template needs one {} .*'a {x} of {}'"),
    ("eval: {templates_en: ['{} {']}\n", r"eval.templates_en: each template needs one {}"),
    ("eval: {templates_zh: ['{{}}']}\n", r"eval.templates_zh: each template needs one {}"),
    ("eval: {templates_en: ['{} or {}']}\n", r"eval.templates_en: each template needs one {}"),
    # numbers out of range: refused before any work (they failed deep inside a stage, with a traceback)
    ("train: {batch_size: 0}\n", "train.batch_size: must be >= 1, got 0"),
    ("train: {lr: -1.0}\n", r"train.lr: must be > 0, got -1.0"),
    ("train: {log_every: 0}\n", "train.log_every: must be >= 1"),
    ("train: {phases: [{steps: -5, losses: {clip: 1.0}}]}\n", "train.phases.0.steps: must be >= 1, got -5"),
    ("train: {phases: [{steps: 5, losses: {clip: -1.0}}]}\n", "train.phases.0.losses.clip: must be >= 0"),
    ("balance: {apply_eps: 2}\n", r"balance.apply_eps: must be in \[0, 1\], got 2"),
    ("balance: {semantic_eps: [0.1, 3]}\n", r"balance.semantic_eps.1: must be in \[0, 1\]"),
    ("data: {image_size: 0}\n", "data.image_size: must be >= 1"),
    ("data: {timeout: 0}\n", "data.timeout: must be > 0"),
    # a negative seed failed inside a balance task ("expected non-negative integer"), one above 2**31-1 in faiss
    ("balance: {seed: -5}\n", r"balance.seed: must be in \[0, 2147483647\], got -5"),
    ("cluster: {seed: 4294967296}\n", r"cluster.seed: must be in \[0, 2147483647\]"),
    ("train: {lr: .inf}\n", "train.lr: must be a finite number, got inf"),
    ("data: {deadline: .nan}\n", "data.deadline: must be a finite number, got nan"),
    # YAML 1.1 reads an unquoted `no` as false: the message says so (img2dataset's resize_mode has a `no`)
    ("data: {resize_mode: no}\n", "expected a string, got bool False \\(YAML reads an unquoted no"),
    ("data: {resize_mode: crop}\n", "data.resize_mode: must be one of border, keep_ratio"),
    ("data: {encode_format: gif}\n", "data.encode_format: must be one of png, jpg, webp"),
])
def test_config_errors_name_the_key(tmp_path, text, needle):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        load_config(str(p))


def test_templates_that_str_format_fills_are_taken():
    cfg = load_config(None, ["eval.templates_en=['a {0}, a kind of {0}.', 'a {{rare}} {}']"])
    assert [t.format("cat") for t in cfg.eval.templates_en] == ["a cat, a kind of cat.", "a {rare} cat"]


def test_every_range_and_choice_names_a_field_of_its_kind():
    """A key in RANGES or CHOICES that is no field (a typo, a renamed setting) would fail every config, one of
    the wrong kind would let a bool pass as a number: caught here. Each default is one of its choices."""
    from cidistill.core.config import CHOICES, RANGES, Config

    for keys in RANGES.values():
        for key in keys.split():
            v = functools.reduce(getattr, key.split("."), Config())
            assert isinstance(v, (int, float)) and not isinstance(v, bool), key
    for key, known in CHOICES.items():
        assert functools.reduce(getattr, key.split("."), Config()) in known, key


def test_cli_reports_config_error(tmp_path, capsys):
    from cidistill.app.cli import main

    p = tmp_path / "c.yaml"
    p.write_text("cluster: {k: ten}\n")
    assert main(["cluster", "-c", str(p)]) == 2
    assert "cluster.k" in capsys.readouterr().err


def test_student_seed_keeps_the_cached_demo_teacher(tmp_path):
    """The demo teacher is cached by what shapes it: another student seed must not retrain it (nor pair a
    student with embeddings of a different teacher), while another held-out style must."""
    from cidistill.app.demo import demo_config, teacher_recipe

    (tmp_path / "download").mkdir()
    (tmp_path / "download" / "stats.json").write_text('{"successes": 1234}')
    base, path = teacher_recipe(demo_config(str(tmp_path), small=True), True)
    seeded, seeded_path = teacher_recipe(demo_config(str(tmp_path), small=True, overrides=["train.seed=3"]), True)
    assert seeded_path == path and seeded.train.seed == base.train.seed == 0
    other = demo_config(str(tmp_path), small=True, overrides=["data.holdout=vendor=apple"])
    assert teacher_recipe(other, True)[1] != path


def test_config_command_prints_commented_yaml_that_loads_back(tmp_path, capsys):
    from cidistill.app.cli import main
    from cidistill.core.config import Config, to_dict

    assert main(["config"]) == 0
    text = capsys.readouterr().out
    p = tmp_path / "all.yaml"
    p.write_text(text)
    assert to_dict(load_config(str(p))) == to_dict(Config())
    assert main(["config", "--check", str(p), "--set", "cluster.k=7"]) == 0
    assert "\n  k: 7\n" in capsys.readouterr().out
    p.write_text(text.replace("apply_eps: 0.05", "apply_eps: lots"))
    assert main(["config", "--check", str(p)]) == 2
    assert "balance.apply_eps" in capsys.readouterr().err


def test_every_config_field_has_a_comment():
    import dataclasses

    from cidistill.core import config as C
    from cidistill.core.config_io import field_docs

    seen, todo, missing = set(), [C.Config], []
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            if not docs.get(f.name):
                missing.append(f"{cls.__name__}.{f.name}")
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for v in (default if isinstance(default, list) else [default]):
                if dataclasses.is_dataclass(v):
                    todo.append(type(v))
    assert len(seen) == 12 and not missing, missing


def test_storage_secrets_are_masked_wherever_the_config_is_shown(tmp_path, capsys):
    """`cidistill config` and the data card's copy of the config show endpoints, never keys or secrets."""
    from cidistill.app.cli import main
    from cidistill.core.config import public_dict

    cfg = tmp_path / "c.yaml"
    cfg.write_text("storage_options: {s3: {endpoint_url: 'http://minio:9000', key: AKIA-visible-id, secret: s3cr3t-value}}\n")
    assert main(["config", "--check", str(cfg)]) == 0
    out = capsys.readouterr().out
    assert "http://minio:9000" in out and "s3cr3t-value" not in out and "AKIA-visible-id" not in out
    assert public_dict(load_config(str(cfg)))["storage_options"] == {"s3": {"endpoint_url": "http://minio:9000",
                                                                           "key": "***", "secret": "***"}}


def test_shipped_configs_load_and_validate():
    """configs/*.yaml are what users start from: each must load (laion-cid.yaml had 2 streams for 8 workers)."""
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = load_config(str(f))
        assert cfg.workdir.startswith("s3://") or f.name != "laion-cid.yaml"


def test_a_value_typed_on_the_command_line_is_taken_as_typed(tmp_path):
    """`--workdir` went through YAML: `runs/my run #2` became `runs/my run` (YAML's comment; the run then wrote
    into another folder without a word) and `runs/exp [1]` a list. `--set` values stay YAML (lists, numbers),
    but a `#` there is part of the value, and text YAML reads as a list or mapping says how to quote it."""
    from cidistill.app.cli import build_parser, make_config

    for folder in ("runs/my run #2", "runs/exp [1]", "runs/a: b", "runs/{x}", 'runs/say "hi"', "runs/中文 ü"):
        args = build_parser().parse_args(["train", "--workdir", folder, "--ray-address", "127.0.0.1:6379 #x"])
        cfg = make_config(args)
        assert (cfg.workdir, cfg.ray_address) == (folder, "127.0.0.1:6379 #x")
    cfg = load_config(None, ["workdir=/runs/my run #2", "data.extra_cols=[a, b]", "train.lr=0.5", "dirs.card='x #3'"])
    assert (cfg.workdir, cfg.data.extra_cols, cfg.train.lr, cfg.dirs["card"]) == ("/runs/my run #2", ["a", "b"], 0.5,
                                                                                "x #3")
    with pytest.raises(ConfigError, match=r"^data.urls: expected a string, got dict \{'/d/a': 'b.csv'\} \(YAML reads "
                                          r"\[..\], \{..\} and 'a: b' as a list or a mapping: quote the text\)$"):
        load_config(None, ["data.urls=/d/a: b.csv"])


def test_a_config_saved_by_a_windows_editor_loads(tmp_path):
    """UTF-16 with its byte-order mark (Notepad's "Unicode", PowerShell's `>`) is YAML too: it was refused as
    "not UTF-8 text: byte 0". UTF-8 with a byte-order mark and CRLF line ends load as well."""
    text = "workdir: runs/中文\r\ntrain:\r\n  lr: 0.5\r\n"
    want = load_config(None, ["workdir=runs/中文", "train.lr=0.5"])
    for i, data in enumerate((text.encode("utf-16"), text.encode("utf-16-be").join([b"\xfe\xff", b""]),
                              text.encode("utf-8-sig"), text.encode())):
        (tmp_path / f"{i}.yaml").write_bytes(data)
        assert load_config(str(tmp_path / f"{i}.yaml"), []) == want, i
