"""Suite files: one TOML file (``[suite]`` grid and verdict rules, ``[run]`` settings) read and
checked in full, and the cells it expands into (seed x partition x method, plus ablations)."""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path

from ..federation import adapter
from ..federation.config import MethodSpec, RunConfig, from_mapping, validate
from ..federation.runner import method_slug, parse_partition, partition_tag

SUITE_KEYS = {
    "name": "folder name under results/ (letters, digits, _ and -)",
    "title": "one-line description for the report",
    "notes": "free text copied into the report (sizing rationale, sources)",
    "requires": "what must exist for the suite to run (weights, data); shown in the report",
    "seeds": "list of integer seeds",
    "partitions": "list of 'iid' | 'dirichlet:ALPHA' | 'quantity:ALPHA' | 'shards:N'",
    "methods": "list of methods run on every partition",
    "ablation_partitions": "partitions that also run ablation_methods",
    "ablation_methods": "structural-copy ablations, e.g. 'fedsq:unfreeze=3'",
    "baseline": "method whose BVA defines the rounds-to-target (default fedavg)",
    "target_fraction": "rounds to this fraction of the baseline's BVA (default 0.95)",
    "noninferiority_margin": "BVA 'same or better' margin, accuracy units (default 0.01)",
    "settle_threshold": "a per-round change has settled once it stays <= this x its round-1 value "
                        "(default 0.25)",
}
# Keys the suite sets per cell; setting them in [run] would be silently overridden.
SUITE_OWNED = ("methods", "seed", "partition", "alpha", "shards_per_client", "out_dir")


def fail(key, msg):
    """Raise the ValueError ``"key: msg"`` that the CLI prints as one line (exit 2)."""
    raise ValueError(f"{key}: {msg}")


@dataclass
class Suite:
    """A suite file as read by :func:`load_suite`: the grid, the verdict rules, the ``[run]`` table."""

    name: str
    path: Path
    run: dict
    seeds: list
    partitions: list
    methods: list
    ablation_partitions: list = field(default_factory=list)
    ablation_methods: list = field(default_factory=list)
    title: str = ""
    notes: str = ""
    requires: str = ""
    baseline: str = "fedavg"
    target_fraction: float = 0.95
    noninferiority_margin: float = 0.01
    settle_threshold: float = 0.25
    text: str = ""  # the file as read, copied next to the results

    @property
    def partition_tags(self) -> list:
        """The partitions' tags, in the file's order."""
        return [spec_tag(p) for p in self.partitions]

    def methods_for(self, spec) -> list:
        """The methods run on partition ``spec``: ``methods``, plus the ablations where they apply."""
        extra = self.ablation_methods if spec_tag(spec) in {spec_tag(p) for p in self.ablation_partitions} else []
        return list(self.methods) + list(extra)

    def base_config(self) -> RunConfig:
        """The ``[run]`` table as a RunConfig (before the per-cell keys)."""
        return from_mapping(self.run)

    def cell_config(self, spec, seed, method) -> RunConfig:
        """The RunConfig of one cell: ``[run]`` plus its seed, partition and method."""
        return dataclasses.replace(self.base_config(), seed=int(seed), methods=[method],
                                   **parse_partition(spec))

    def cells(self) -> list:
        """(seed, partition spec, method) in run order: seed-major, so every cell gets its
        first seed before any cell gets its second (an interrupted suite is still balanced)."""
        return [(s, p, m) for s in self.seeds for p in self.partitions for m in self.methods_for(p)]


def spec_tag(spec: str) -> str:
    """A partition spec's canonical tag ('dirichlet:0.50' -> 'dirichlet:0.5'): the run's label."""
    d = dict(partition="iid", alpha=0.0, shards_per_client=0)
    d.update(parse_partition(spec))
    return partition_tag(d)


def tag_slug(tag: str) -> str:
    """A partition tag as a folder name ('dirichlet:0.5' -> 'dirichlet_0.5')."""
    return tag.replace(":", "_")


def _str_list(d, key, parse=None, allow_empty=False):
    v = d.get(key, [])
    if not isinstance(v, list) or (not v and not allow_empty) or not all(isinstance(x, (str, int)) for x in v):
        fail(key, f"must be a {'possibly empty ' if allow_empty else 'non-empty '}list, got {v!r}")
    if len(set(map(str, v))) != len(v):
        fail(key, f"has duplicate entries: {v}")
    for x in v:
        if parse is not None:
            parse(x)
    return list(v)


def load_suite(path) -> Suite:
    """Read and check a suite file in full (every key, every cell's config) before any work."""
    import tomllib

    p = Path(path)
    if not p.is_file():
        fail("suite", f"file not found: {p}")
    if p.suffix != ".toml":
        fail("suite", f"{p}: a suite is a .toml file")
    text = p.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail("suite", f"{p}: {e}")
    for k in doc:
        if k not in ("suite", "run"):
            fail(k, f"unknown table in {p.name}; a suite file has [suite] and [run]")
    s = doc.get("suite")
    if not isinstance(s, dict):
        fail("suite", f"{p.name} needs a [suite] table")
    for k in s:
        if k not in SUITE_KEYS:
            near = difflib.get_close_matches(k, SUITE_KEYS, n=3)
            fail(f"suite.{k}", "unknown key" + (f" (did you mean {', '.join(near)}?)" if near else
                                                   f"; valid: {', '.join(SUITE_KEYS)}"))
    name = s.get("name")
    if not isinstance(name, str) or not name or not all(c.isalnum() or c in "_-" for c in name):
        fail("suite.name", f"must be a non-empty name of letters, digits, _ and -, got {name!r}")
    seeds = s.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(isinstance(x, int) and not isinstance(x, bool)
                                                           and x >= 0 for x in seeds):
        fail("suite.seeds", f"must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        fail("suite.seeds", f"has duplicate entries: {seeds}")

    def part(x):
        if not isinstance(x, str):
            fail("suite.partitions", f"entries must be strings, got {x!r}")
        try:
            parse_partition(x)
        except ValueError as e:
            fail("suite.partitions", str(e))

    def meth(x):
        try:
            MethodSpec.parse(x)
        except ValueError as e:
            fail("suite.methods", str(e))

    parts = _str_list(s, "partitions", part)
    if len({spec_tag(x) for x in parts}) != len(parts):
        fail("suite.partitions", f"two entries name the same partition: {parts}")
    methods = _str_list(s, "methods", meth)
    abl_parts = _str_list(s, "ablation_partitions", part, allow_empty=True)
    abl_methods = _str_list(s, "ablation_methods", meth, allow_empty=True)
    for x in abl_parts:
        if spec_tag(x) not in {spec_tag(q) for q in parts}:
            fail("suite.ablation_partitions", f"{x!r} is not in partitions {parts}")
    if bool(abl_parts) != bool(abl_methods):
        fail("suite.ablation_methods", "give both ablation_partitions and ablation_methods, or neither")
    dup = set(abl_methods) & set(methods)
    if dup:
        fail("suite.ablation_methods", f"already in methods: {sorted(dup)}")
    baseline = s.get("baseline", "fedavg")
    if baseline not in methods:
        fail("suite.baseline", f"{baseline!r} must be one of methods {methods}")
    kw = {}
    for k, lo, hi in (("target_fraction", 0.0, 1.0), ("noninferiority_margin", 0.0, 1.0),
                      ("settle_threshold", 0.0, 1.0)):
        if k in s:
            v = s[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (lo < v <= hi or
                                                                             (k == "noninferiority_margin" and v == 0)):
                fail(f"suite.{k}", f"must be a number in ({lo}, {hi}], got {v!r}")
            kw[k] = float(v)
    for k in ("title", "notes", "requires"):
        if k in s and not isinstance(s[k], str):
            fail(f"suite.{k}", f"must be a string, got {s[k]!r}")
        kw[k] = s.get(k, "")
    run = doc.get("run", {})
    if not isinstance(run, dict):
        fail("run", "must be a table of RunConfig keys")
    for k in run:
        if k.replace("-", "_") in SUITE_OWNED:
            fail(f"run.{k}", "is set per cell by [suite] (seeds, partitions, methods, --out); remove it here")
    suite = Suite(name=name, path=p, run=dict(run), seeds=list(seeds), partitions=parts, methods=methods,
                  ablation_partitions=abl_parts, ablation_methods=abl_methods, baseline=baseline,
                  text=text, **kw)
    models = adapter.list_models()
    try:
        base = suite.base_config()  # unknown [run] keys raise here, naming the key
    except ValueError as e:
        raise ValueError(f"run.{e}") from None
    for spec in parts:
        for m in suite.methods_for(spec):
            c = suite.cell_config(spec, seeds[0], m)
            try:
                validate(c, models)
            except ValueError as e:
                raise ValueError(f"run.{e} (partition {spec}, method {m})") from None
    del base
    return suite


def default_out(suite: Suite) -> Path:
    """experiments/<suite>.toml -> experiments/results/<name>/."""
    return suite.path.resolve().parent / "results" / suite.name


def cell_dir(out, spec, seed, method) -> Path:
    """A grid run's folder: ``OUT/<partition>/seed<s>/<method>`` (suites and ``fedsq-fast compare``)."""
    return Path(out) / tag_slug(spec_tag(spec)) / f"seed{seed}" / method_slug(method)

