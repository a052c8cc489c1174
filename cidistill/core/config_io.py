"""Typed dataclasses from YAML files and `key=value` overrides, generic over any dataclass: type checks that
name the full key, merging, safe YAML (no key given twice, no alias bombs), masking of secrets, and each
field's comment read from its source (cidistill/core/config.py holds the config itself)."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from .store import SECRET_WORDS, redacted


class ConfigError(ValueError):
    pass


def _check(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return from_dict(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _check(a, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not fit {tp}")
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_check(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        kt, vt = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        return {_check(kt, k, f"{key}.{k}"): _check(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {type(value).__name__} {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            hint = " (YAML reads an unquoted no, off, yes or on as true/false: quote it, as in 'no')" \
                if isinstance(value, bool) else " (YAML reads [..], {..} and 'a: b' as a list or a mapping: quote " \
                "the text)" if isinstance(value, (list, dict)) else ""
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__} {value!r}{hint}")
        return value
    return value


def from_dict(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown config key(s): {', '.join(where + k for k in sorted(unknown))}")
    kwargs = {k: _check(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def masked(storage_options: dict) -> dict:
    """Storage options as they may be shown or recorded: endpoints kept, secrets never."""
    return {p: {k: "***" if any(w in k.lower() for w in SECRET_WORDS) else v for k, v in o.items()}
            for p, o in storage_options.items()}


def merge(base: dict, over: dict, prefix: str = "") -> dict:
    """`over` wins key by key; a list is indexed by number (`train.phases.1.steps=450`)."""
    def one(old, new, key: str):
        return merge(old, new, f"{key}.") if isinstance(new, dict) and isinstance(old, dict) else new

    out = dict(base)
    for k, v in over.items():
        old, key = out.get(k), f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(old, list) and v and all(str(i).isdigit() for i in v):
            old = list(old)
            for i, item in v.items():
                if int(i) >= len(old):
                    raise ConfigError(f"{key}.{i}: the list has {len(old)} item(s)")
                old[int(i)] = one(old[int(i)], item, f"{key}.{i}")
            out[k] = old
        else:
            out[k] = one(old, v, key)
    return out


def _drops_a_comment(v: str) -> bool:
    """Whether YAML would read the end of a command-line value as a comment (`workdir=/runs/my run #2` gave
    `/runs/my run`): a value typed there has no comments, so the text is taken whole."""
    try:
        tokens = [t for t in yaml.scan(v) if not isinstance(t, (yaml.StreamStartToken, yaml.StreamEndToken))]
    except yaml.YAMLError:
        return False
    end = max((t.end_mark.index for t in tokens), default=0)
    return v[end:].strip().startswith("#")


def parse_overrides(pairs: list[str]) -> dict:
    """`train.batch_size=64 balance.semantic_eps=[0.05,0.1]` -> nested dict (values parsed as YAML)."""
    out: dict = {}
    for p in pairs:
        if "=" not in p:
            raise ConfigError(f"override {p!r}: expected key=value")
        k, v = p.split("=", 1)
        node, parts = out, k.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {p!r}: expected key=value with a key such as train.lr (a dotted name)")
        for i, part in enumerate(parts):  # through what earlier overrides of this command set: sections, lists by index
            if isinstance(node, list) and not (part.isdigit() and int(part) < len(node)):
                raise ConfigError(f"override {k.strip()!r}: {part!r} is not an index of the list set before it")
            if not isinstance(node, (dict, list)):
                raise ConfigError(f"override {k.strip()!r}: an earlier override set a value there, not a section")
            if i < len(parts) - 1:
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        last = int(parts[-1]) if isinstance(node, list) else parts[-1]
        try:
            node[last] = v.strip() if _drops_a_comment(v) else yaml.safe_load(v)
            expanded_size(node[last])
        except yaml.YAMLError:
            raise ConfigError(f"override {k.strip()!r}: the value is not valid YAML") from None
        except (ValueError, RecursionError) as e:
            raise ConfigError(f"override {k.strip()!r}: {e or 'nested too deeply'}") from None
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, but a key given twice in one mapping is an error (YAML keeps the last one silently: a
    second `train:` block dropped the first's settings)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base` then a key of its own overrides: fine
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_CONFIG_VALUES = 100_000


def expanded_size(obj, memo: dict | None = None) -> int:
    """How many values a loaded document holds with its aliases expanded (each use of an anchor counts): a
    few lines of nested aliases expand to billions, which every later walk of the config would build. Linear
    in the distinct objects; ValueError above MAX_CONFIG_VALUES or for a value that contains itself."""
    memo = {} if memo is None else memo
    if not isinstance(obj, (dict, list)):
        return 1
    if id(obj) in memo:
        if memo[id(obj)] is None:
            raise ValueError("a YAML alias refers to a value that contains it")
        return memo[id(obj)]
    memo[id(obj)] = None
    items = [x for kv in obj.items() for x in kv] if isinstance(obj, dict) else obj
    n = 1 + sum(expanded_size(x, memo) for x in items)
    if n > MAX_CONFIG_VALUES:
        raise ValueError(f"expands to more than {MAX_CONFIG_VALUES:,} values (YAML aliases repeated inside each other)")
    memo[id(obj)] = n
    return n


def read_config_file(path: str) -> dict:
    """A YAML config file as a mapping; every way it can be wrong is one ConfigError naming the file."""
    try:
        raw = Path(path).read_bytes()
        # YAML is UTF-8 or, marked by its byte-order mark, UTF-16 (what Windows editors and PowerShell's `>` save)
        text = raw.decode("utf-16") if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else raw.decode("utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from None
    except UnicodeDecodeError as e:  # a parquet or image given where the YAML goes
        raise ConfigError(f"{path}: not a YAML config file (not UTF-8 text: byte {e.start})") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        expanded_size(loaded)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', None) or e})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply to be a config") from None
    except ValueError as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return loaded


def field_docs(cls) -> dict[str, str]:
    """Each field's comment as written beside it (or on the lines just above) in the dataclass source: the one
    place a field is documented, read by `cidistill config`."""
    import inspect
    import io
    import tokenize

    docs, pending = {}, []
    names = {f.name for f in dataclasses.fields(cls)}
    for line in inspect.getsource(cls).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            pending.append(text[1:].strip())
            continue
        name = text.split(":", 1)[0].strip()
        if line.startswith("    ") and not line.startswith("     ") and name in names:
            comments = [t.string[1:].strip() for t in tokenize.generate_tokens(io.StringIO(text).readline)
                        if t.type == tokenize.COMMENT]
            docs[name] = " ".join(pending + comments).strip()
        pending = []
    return docs


def to_yaml(cfg, unicode: bool = True) -> str:
    """The whole config as YAML, every field preceded by its comment (secrets masked, in storage options and
    in URIs); `load_config` reads it back. Not `unicode`: other characters as YAML escapes (ASCII only)."""
    lines: list[str] = []

    def emit(obj, indent: str) -> None:
        docs = field_docs(type(obj))
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            for part in _wrap(docs.get(f.name, ""), 110 - len(indent)):
                lines.append(f"{indent}# {part}")
            if dataclasses.is_dataclass(value):
                lines.append(f"{indent}{f.name}:")
                emit(value, indent + "  ")
            else:
                if f.name == "storage_options":
                    value = masked(value)
                plain = redacted(json.loads(json.dumps(value, default=dataclasses.asdict)))
                dumped = yaml.safe_dump(plain, default_flow_style=True, allow_unicode=unicode, width=10 ** 6).strip()
                lines.append(f"{indent}{f.name}: {dumped.removesuffix(chr(10) + '...').strip()}")

    emit(cfg, "")
    return "\n".join(lines) + "\n"


def _wrap(text: str, width: int) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width) if text else []
