"""Parse the engine's Prometheus exposition: values for the probes, a clean block to pass on.

One pass over the text yields
- ``values``: each sample name (``vllm:num_requests_running``, ``vllm:generation_tokens_total``,
  ``..._sum``/``..._count``) summed over its label sets (buckets, quantiles and
  ``_created`` left out), for stall detection and the proxy;
- ``text``: the kept families (name prefix ``vllm:``) re-emitted as well-formed text
  format 0.0.4: one ``# HELP``/``# TYPE`` pair per family, families contiguous,
  duplicates dropped, OpenMetrics-only syntax (``# EOF``, ``# UNIT``, exemplars)
  removed, and optionally names made promtool-clean (``promtool_names``): ``:`` becomes
  ``_`` (promtool's lint reserves colons for recording rules) and a family that is
  not a counter loses a ``_total`` suffix (``vllm:iteration_tokens_total``, a
  histogram, becomes ``vllm_iteration_tokens``).

Malformed lines are dropped and counted, never raised: a scrape must not fail
because the engine printed something odd.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABELS = re.compile(r'\{(?:[^"}]|"(?:[^"\\]|\\.)*")*\}')
_TYPES = {"counter", "gauge", "histogram", "summary", "untyped", "unknown"}
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("_count", "_sum", "_created"),
}
_NOT_VALUES = ("_bucket", "_created")


@dataclass
class Exposition:
    values: dict[str, float] = field(default_factory=dict)
    text: str = ""
    families: int = 0
    errors: int = 0  # lines or families dropped


@dataclass
class _Family:
    name: str
    type: str = "untyped"
    help: str | None = None
    samples: list[tuple[str, str, str]] = field(default_factory=list)  # name, labels, rest
    broken: bool = False

    def owns(self, sample_name: str) -> bool:
        if sample_name == self.name:
            return True
        rest = sample_name[len(self.name) :] if sample_name.startswith(self.name) else None
        return rest is not None and rest in _SUFFIXES.get(self.type, ())


def parse_exposition(
    text: str, keep_prefix: str = "vllm:", promtool_names: bool = True
) -> Exposition:
    out = Exposition()
    families: list[_Family] = []
    seen: set[str] = set()
    current: _Family | None = None

    def start(name: str) -> _Family:
        fam = _Family(name)
        if name in seen:  # a family split in two blocks: keep the first only
            fam.broken = True
            out.errors += 1
        seen.add(name)
        families.append(fam)
        return fam

    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line[0] == "#":
            parts = line.split(None, 3)
            if len(parts) < 3 or parts[1] not in ("HELP", "TYPE"):
                continue  # comments, # EOF, # UNIT
            name = parts[2]
            if not _NAME.fullmatch(name):
                out.errors += 1
                continue
            if current is None or current.name != name:
                current = start(name)
            arg = parts[3] if len(parts) > 3 else ""
            if parts[1] == "HELP":
                current.help = current.help if current.help is not None else arg
            else:
                kind = arg.strip().lower()
                if kind not in _TYPES:
                    current.broken = True
                    out.errors += 1
                current.type = "untyped" if kind == "unknown" else kind
            continue
        if not line.startswith(keep_prefix):
            continue  # a sample of a family not passed on: no need to parse it
        sample = _parse_sample(line)
        if sample is None:
            out.errors += 1
            continue
        name, labels, rest = sample
        if current is None or not current.owns(name):
            current = start(name)
        current.samples.append((name, labels, rest))

    chunks: list[str] = []
    emitted: set[str] = set()
    for fam in families:
        if fam.broken or not fam.name.startswith(keep_prefix):
            continue
        out_name = _out_name(fam.name, fam.type, promtool_names)
        if out_name in emitted:  # two engine names that rename to one: keep the first
            out.errors += 1
            continue
        emitted.add(out_name)
        _add_values(out.values, fam)
        chunks.append(_render(fam, promtool_names))
        out.families += 1
    out.text = "".join(chunks)
    return out


def sample_values(text: str, keep_prefix: str = "vllm:") -> tuple[dict[str, float], int]:
    """The ``values`` of ``parse_exposition`` alone, in a fraction of its time.

    For the probes' once-a-second scrape, which needs a few numbers, not the text to
    pass on. Returns (values, malformed sample lines)."""
    values: dict[str, float] = {}
    errors = 0
    for line in text.splitlines():
        if not line.startswith(keep_prefix):
            continue
        end = line.find("{")
        if end == -1:
            end = line.find(" ")
        if line[:end].endswith(_NOT_VALUES):  # most lines are buckets: skip them unparsed
            continue
        sample = _parse_sample(line.strip())
        if sample is None:
            errors += 1
            continue
        name, labels, rest = sample
        if name.endswith(_NOT_VALUES) or 'quantile="' in labels:
            continue
        val = float(rest.split()[0])
        if not math.isnan(val):
            values[name] = values.get(name, 0.0) + val
    return values, errors


@functools.lru_cache(maxsize=4096)
def _valid_name(name: str) -> bool:
    return _NAME.fullmatch(name) is not None


def _split_name_labels(line: str) -> tuple[str, str, int] | None:
    """(name, labels, where the value starts): a fast path for plain lines, the full
    label grammar (escapes, braces inside values) where a line needs it."""
    brace, space = line.find("{"), line.find(" ")
    if brace == -1 or (space != -1 and space < brace):
        if space == -1 or not _valid_name(line[:space]):
            return None
        return line[:space], "", space
    name = line[:brace]
    if not _valid_name(name):
        return None
    close = line.find("}", brace)
    if close != -1 and "\\" not in line and line.count('"', brace, close) % 2 == 0:
        return name, line[brace : close + 1], close + 1
    lm = _LABELS.match(line, brace)
    if lm is None:
        return None
    return name, lm.group(0), lm.end()


def _parse_sample(line: str) -> tuple[str, str, str] | None:
    split = _split_name_labels(line)
    if split is None:
        return None
    name, labels, pos = split
    rest = line[pos:].split(" # ", 1)[0].split()  # drop OpenMetrics exemplars
    if not rest or len(rest) > 2:
        return None
    try:
        float(rest[0])
        if len(rest) == 2:
            float(rest[1])
    except ValueError:
        return None
    return name, labels, " ".join(rest)


def _add_values(values: dict[str, float], fam: _Family) -> None:
    for name, labels, rest in fam.samples:
        if name.endswith(_NOT_VALUES) or 'quantile="' in labels:
            continue
        val = float(rest.split()[0])
        if math.isnan(val):
            continue
        values[name] = values.get(name, 0.0) + val


def _out_name(name: str, kind: str, promtool_names: bool) -> str:
    if not promtool_names:
        return name
    renamed = name.replace(":", "_")
    if kind != "counter" and renamed.endswith("_total"):
        renamed = renamed[: -len("_total")]
    return renamed


def _render(fam: _Family, promtool_names: bool) -> str:
    family_name = fam.name
    samples = fam.samples
    renamed = _out_name(family_name, fam.type, promtool_names)

    def nm(name: str) -> str:
        if not promtool_names:
            return name
        if name.startswith(fam.name):
            return renamed + name[len(fam.name) :]
        return name.replace(":", "_")

    if fam.type == "counter" and not family_name.endswith("_total"):
        # OpenMetrics names a counter family without _total; text format with it
        family_name += "_total"
        samples = [s for s in samples if s[0].endswith("_total")]
    elif fam.type in ("counter", "histogram", "summary"):
        samples = [s for s in samples if not s[0].endswith("_created") or s[0] == fam.name]
    help_text = fam.help if fam.help else "Passed through from the engine."
    lines = [f"# HELP {nm(family_name)} {help_text}\n", f"# TYPE {nm(family_name)} {fam.type}\n"]
    lines += [f"{nm(name)}{labels} {rest}\n" for name, labels, rest in samples]
    return "".join(lines)
