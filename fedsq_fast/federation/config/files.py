"""Config mappings and files: the flat, legacy ``[run]`` and sectioned forms, the keys a
user set, TOML/YAML reading with errors naming the file and line."""
from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path

from .errors import ConfigError, _fail
from .sections import KEYS, LEGACY_VALUES, RECORDED_CORE, SECTION_OF, SECTIONS, RunConfig


def _norm_key(k, where=""):
    if not isinstance(k, str):  # YAML allows `1: 2`
        _fail(repr(k), "config keys are names, not " + type(k).__name__)
    k2 = k.replace("-", "_")
    if k2 not in SECTION_OF:
        near = difflib.get_close_matches(k2, KEYS, n=3)
        _fail(k, f"unknown config key{where}" + (f" (did you mean {', '.join(near)}?)" if near else
                                                 f"; valid keys: {', '.join(KEYS)}"))
    return k2


def _line_of(text: str | None, section: str, key: str) -> int | None:
    """The line of ``key`` under ``[section]`` (TOML) or ``section:`` (YAML) in ``text``, or
    None (a plain scan: good enough to point at the key, not a parser)."""
    import re

    if not text:
        return None
    head = re.compile(rf"^\s*(\[\s*{re.escape(section)}\s*\]|{re.escape(section)}\s*:)\s*(#.*)?$")
    other = re.compile(r"^\s*\[|^\S[^:]*:\s*(#.*)?$")
    names = {key, key.replace("_", "-")}
    pat = re.compile(r"^\s*[\"']?(" + "|".join(map(re.escape, names)) + r")[\"']?\s*[=:]")
    inside = False
    for i, ln in enumerate(text.splitlines(), 1):
        if head.match(ln):
            inside = True
        elif inside and other.match(ln):
            inside = False
        elif inside and pat.match(ln):
            return i
    return None


def flatten(d: dict, source=None, text: str | None = None) -> dict:
    """The flat config keys of a mapping in any of the three forms:

    - flat: ``{"lr": 0.1, "rounds": 3}``;
    - legacy ``run`` table, its only table: ``{"run": {"lr": 0.1, "rounds": 3}}``;
    - sectioned: tables named after the sections, each holding its own keys,
      ``{"client": {"lr": 0.1}, "run": {"rounds": 3}}`` (with any table besides ``run``,
      ``run`` holds the run section only).

    Keys beside the tables, a table that is not a section, a key under a section that does
    not read it (naming the section that does, and the line of ``text`` when given) and
    unknown keys are :class:`ConfigError` s naming ``source``."""
    def fail(key, msg):
        raise ConfigError(key, msg, source)

    tables = [k for k, v in d.items() if isinstance(v, dict)]
    if not tables:
        return d
    beside = [str(k) for k in d if k not in tables]
    not_sections = [str(t) for t in tables if t not in SECTIONS]
    if not_sections:
        t = not_sections[0]
        fail(t, f"is a table, but config tables are the sections {', '.join(f'[{s}]' for s in SECTIONS)}")
    if tables == ["run"]:  # the legacy form: every key in [run]
        if beside:  # an error, not a merge: which of the two values was meant is the user's call
            fail("config", f"{', '.join(beside)} {'is' if len(beside) == 1 else 'are'} outside the [run] "
                           "table, where they would be ignored; move them into [run] (or drop the [run] header)")
        return dict(d["run"])
    if beside:
        where = "; ".join(f"{k} -> [{SECTION_OF[k.replace('-', '_')]}]" for k in beside
                          if k.replace("-", "_") in SECTION_OF)
        fail("config", f"{', '.join(beside)} {'is' if len(beside) == 1 else 'are'} outside the sections "
                       f"{', '.join(f'[{t}]' for t in tables)}; in a sectioned file every key goes in its "
                       f"section" + (f" ({where})" if where else ""))
    out = {}
    for sec in tables:
        for k, v in d[sec].items():
            try:
                k2 = _norm_key(k, f" in [{sec}]")
            except ConfigError as e:
                raise e.with_source(source) from None
            home = SECTION_OF[k2]
            if home != sec:
                line = _line_of(text, sec, k2)
                fail(k, f"in [{sec}]{f' (line {line})' if line else ''}, but {k2} is read from the [{home}] "
                        f"section; move it there")
            out[k] = v
    return out


def _nullable(key: str) -> bool:
    """Whether ``key`` may be None (its annotation admits it)."""
    import typing

    return type(None) in typing.get_args(typing.get_type_hints(RunConfig).get(key, str))


def from_mapping(d: dict, base: RunConfig | None = None, *, recorded: bool | None = None) -> RunConfig:
    """A config from a mapping of config keys (flat, or sectioned: :func:`flatten`) over
    ``base`` (default: the defaults); unknown keys are rejected with the closest valid ones.

    The keys of ``d`` count as set by the user (``explicit_keys``: an option that none of
    the methods reads is then an error in :func:`validate`), unless ``d`` is a recorded
    config: ``recorded=None`` (default) takes a mapping that holds every key recordings have
    always held (``RECORDED_CORE``; what ``to_dict()`` writes: metrics.json, checkpoints,
    suites) as recorded; True/False force it. A recording without a key added since takes its
    ``LEGACY_VALUES`` entry (what such runs computed with). TOML has no null: the string
    "none" (or "null") means None for the keys that may be None, as on the command line."""
    if not isinstance(d, dict):
        _fail("config", f"must be a mapping of config keys, got {type(d).__name__}")
    d = flatten(d)
    cfg = dataclasses.replace(base) if base is not None else RunConfig()
    names = []
    for k, v in d.items():
        k2 = _norm_key(k)
        if isinstance(v, str) and v.strip().lower() in ("none", "null") and _nullable(k2):
            v = None
        setattr(cfg, k2, v)
        names.append(k2)
    if isinstance(cfg.methods, str):
        cfg.methods = [m.strip() for m in cfg.methods.split(",") if m.strip()]
    if recorded is None:
        recorded = set(names) >= RECORDED_CORE
    if recorded:  # keys added after the recording take the value that reproduces its run
        for k, v in LEGACY_VALUES.items():
            if k not in names:
                setattr(cfg, k, v)
    kept = base.explicit_keys if base is not None else frozenset()
    # a recorded value replaces what the user had set for that key
    cfg.__dict__["_explicit"] = kept - set(names) if recorded else kept | set(names)
    return cfg


def _read_text(p: Path, key: str = "config") -> str:
    raw = p.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        _fail(key, f"{p}: line {line}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                   "save the file as UTF-8")


def read_toml(path, key: str = "config") -> dict:
    """A TOML file as a dict; text that is not UTF-8 and syntax errors are a
    :class:`ConfigError` naming ``key``, the file and the line."""
    import re
    import tomllib

    p = Path(path)
    text = _read_text(p, key)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column (\d+)\)", str(e))
        # python 3.11 reports an unterminated value "at end of document": the last line
        where = f"line {m.group(1)}, column {m.group(2)}" if m else f"line {max(1, len(text.splitlines()))}"
        msg = re.sub(r"\s*\(at [^)]*\)$", "", str(e))
        _fail(key, f"{p}: {where}: TOML syntax error: {msg}")


class _DuplicateKey(Exception):
    def __init__(self, key, line, first):
        super().__init__(key)
        self.key, self.line, self.first = key, line, first


_LOADER = None


def _unique_key_loader():
    """A yaml.SafeLoader that refuses a key given twice in one mapping (plain SafeLoader keeps
    the last silently; TOML refuses it too). Keys merged in with ``<<`` may be overridden."""
    global _LOADER
    if _LOADER is None:
        import yaml

        class UniqueKeyLoader(yaml.SafeLoader):
            def construct_mapping(self, node, deep=False):
                if isinstance(node, yaml.MappingNode):
                    seen = {}
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":
                            continue
                        key = self.construct_object(key_node, deep=True)
                        try:
                            first = seen.setdefault(key, key_node.start_mark.line + 1)
                        except TypeError:  # an unhashable key: SafeLoader refuses it itself
                            continue
                        if first != key_node.start_mark.line + 1:
                            raise _DuplicateKey(key, key_node.start_mark.line + 1, first)
                return super().construct_mapping(node, deep=deep)

        _LOADER = UniqueKeyLoader
    return _LOADER


def read_json(path, key: str):
    """A JSON file (a recorded metrics.json, run_info.json, ...) parsed strictly: a file that
    is missing, not UTF-8, malformed, or that gives one key twice in an object is a
    :class:`ConfigError` naming ``key``, the file and the line."""
    import json

    p = Path(path)
    text = _read_text(p, key)

    def pairs(kv):
        out = {}
        for k, v in kv:
            if k in out:
                line = _line_of_json_key(text, k)
                _fail(key, f"{p}: {f'line {line}: ' if line else ''}duplicate key {k!r} in one object")
            out[k] = v
        return out

    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        _fail(key, f"{p}: line {e.lineno}, column {e.colno}: not valid JSON: {e.msg}")


def _line_of_json_key(text: str, k: str) -> int | None:
    """The line of the second ``"k":`` in ``text`` (where a duplicate is), or None."""
    import json
    import re

    hits = [m.start() for m in re.finditer(re.escape(json.dumps(k)) + r"\s*:", text)]
    return text.count("\n", 0, hits[1]) + 1 if len(hits) > 1 else None


def load_file(path) -> dict:
    """The flat config keys of a TOML (.toml) or YAML (.yaml/.yml) file, in any of the forms
    :func:`flatten` reads: flat keys, a legacy ``[run]`` table (YAML: ``run:`` mapping) of
    flat keys, or sections ``[data]``, ``[model]``, ``[client]``, ``[strategy]``, ``[run]``.
    Keys beside the tables are an error (they would be ignored otherwise), and so is a key
    in a section that does not read it (naming the key, the section it belongs to, the
    file and the line). Syntax errors and text that is not UTF-8 name the file and line."""
    p = Path(path)
    if not p.exists():
        _fail("config", f"file not found: {p}")
    if not p.is_file():
        _fail("config", f"{p} is not a file")
    if p.suffix not in (".toml", ".yaml", ".yml"):
        _fail("config", f"{p}: use a .toml, .yaml or .yml file")
    if p.suffix == ".toml":
        d = read_toml(p)
        text = _read_text(p)
    else:
        import yaml

        text = _read_text(p)
        try:
            d = yaml.load(text, Loader=_unique_key_loader())  # noqa: S506 (a SafeLoader)
        except _DuplicateKey as e:
            _fail("config", f"{p}: line {e.line}: duplicate key {e.key!r} (first at line {e.first}); "
                            "a file sets each key once")
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            _fail("config", f"{p}: {where}YAML syntax error: {what}")
        d = {} if d is None else d
    if not isinstance(d, dict):
        _fail("config", f"{p}: top level must be a table/mapping of config keys, got {type(d).__name__}")
    return flatten(d, source=p, text=text)


def load_config(path, base: RunConfig | None = None) -> RunConfig:
    """:func:`load_file` + :func:`from_mapping` (the file's keys count as set by the user,
    unless it holds every key: a recorded config); key errors name the file."""
    d = load_file(path)
    try:
        return from_mapping(d, base)
    except ConfigError as e:
        raise e.with_source(path) from None
