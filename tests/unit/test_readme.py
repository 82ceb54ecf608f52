"""README.md is an operator's guide: every `sentinel ...` command it shows exists and parses
(`--help`), every option it names is one that command takes, every `section.key` config key
it names exists in the schema, every `sentinel_*` series it names is defined in the code,
and every file it points to is in the tree."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.main import get_command
from typer.testing import CliRunner

from sentinel.cli.main import _register_optional, app
from sentinel.config.schema import SentinelConfig

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)
# `sentinel` (or `.venv/bin/sentinel`) at the start of a line of code, then its words
COMMAND = re.compile(r"^(?:\S*/)?sentinel((?: [^`#|>\n]*)?)$")
KEY = re.compile(r"(?<![\w/.$-])([a-z_]+(?:\.[a-z_0-9]+)+)(?![\w/-])")
OPTION = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)")
SERIES = re.compile(r"(sentinel_[a-z_]+)(?:\{[^}]*\})?(?: \d)?")
FILE = re.compile(
    r"(?<![\w/.-])((?:alerts|bench|dashboards|deploy|docs|runbooks|sentinel)/[\w./-]+)"
)


def _code_lines() -> list[str]:
    """Inline code spans and each line of the code blocks (blocks removed before spans)."""
    blocks = FENCE.findall(README)
    rest = FENCE.sub("", README)
    lines: list[str] = []
    for block in blocks:
        for raw in block.splitlines():
            line = raw.split(" #")[0].strip()
            if line.startswith("[") and lines:  # a usage line continued
                lines[-1] += " " + line
            else:
                lines.append(line)
    return lines + SPAN.findall(rest)


def _commands() -> dict[str, tuple[list[str], list[str]]]:
    """Each `sentinel ...` line shown -> (its subcommand path, the options it names)."""
    out: dict[str, tuple[list[str], list[str]]] = {}
    for line in _code_lines():
        m = COMMAND.match(line)
        if not m:
            continue
        words = m.group(1).split()
        path = []
        for w in words:
            if not re.fullmatch(r"[a-z][a-z-]*", w):
                break
            path.append(w)
        out[line] = (path, OPTION.findall(m.group(1)))
    return out


def _sections() -> set[str]:
    return set(SentinelConfig.model_fields)


def _resolve(dotted: str) -> str | None:
    """None when `dotted` is a key of the schema, else what is wrong with it."""
    model: type[BaseModel] = SentinelConfig
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return f"{'.'.join(parts[: i + 1])}: no such key"
        ann = field.annotation
        inner = next(
            (a for a in (ann, *getattr(ann, "__args__", ())) if _is_model(a)),
            None,
        )
        if inner is None:
            # a leaf (or a mapping of user-chosen names): nothing below it is a schema key
            return (
                None if i == len(parts) - 1 or _is_mapping(ann) else f"{dotted}: {part} is a leaf"
            )
        model = inner
    return None


def _is_model(t: object) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _is_mapping(t: object) -> bool:
    return getattr(t, "__origin__", None) is dict


def _keys() -> set[str]:
    sections = _sections()
    found = set()
    for span in _code_lines():
        if "unknown key" in span:  # the README's example of a start-up error
            continue
        for key in KEY.findall(span):
            if key.split(".")[0] in sections and not key.endswith((".md", ".yaml", ".py")):
                found.add(key)
    return found


def test_readme_opens_with_the_two_commands() -> None:
    first_block = FENCE.search(README)
    assert first_block is not None
    lines = [ln.split("#")[0].strip() for ln in first_block.group(1).splitlines()]
    assert lines == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in ("demo", "test", "setup"):
        assert re.search(rf"^{target}:", makefile, re.M), f"Makefile has no {target} target"


def test_readme_stays_an_operators_guide() -> None:
    assert len(README.splitlines()) <= 450
    assert "## Sidecar (attach mode)" in README
    # no dated figures: dates belong in docs/benchmarks.md
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", README), "dated figures go to docs/benchmarks.md"


def test_readme_shows_commands_and_keys() -> None:
    subs = {path[0] for path, _ in _commands().values() if path}
    assert {"run", "config", "status", "doctor", "gpu", "drain", "restart"} <= subs
    assert len(_keys()) > 40


@pytest.mark.parametrize("line", sorted(_commands()))
def test_every_sentinel_command_shown_exists_and_takes_its_options(line: str) -> None:
    path, options = _commands()[line]
    if "doctor" not in get_command(app).commands:  # type: ignore[attr-defined]
        _register_optional()  # what `sentinel` (main()) does before it parses
    res = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert res.exit_code == 0, f"`sentinel {' '.join(path)} --help`: {res.output[-1500:]}"
    cmd = get_command(app)
    ctx = None
    for word in path:
        ctx = cmd.make_context(cmd.name or "sentinel", [word, "--help"], resilient_parsing=True)
        cmd = cmd.get_command(ctx, word)  # type: ignore[attr-defined]
        assert cmd is not None, f"no command {word!r} in {line!r}"
    known = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
    unknown = [o for o in options if o not in known]
    assert not unknown, f"`{line}`: `sentinel {' '.join(path)}` takes no {unknown}"


@pytest.mark.parametrize("key", sorted(_keys()))
def test_every_config_key_shown_exists(key: str) -> None:
    assert _resolve(key) is None, _resolve(key)


def test_every_file_shown_exists() -> None:
    missing = sorted(
        {f.rstrip(".") for f in FILE.findall(README) if not (ROOT / f.rstrip(".")).exists()}
    )
    assert not missing, f"README.md points to files that do not exist: {missing}"


def test_every_series_shown_is_defined() -> None:
    """A series is defined where its name (counters without ``_total``) is a string in
    sentinel/ (prometheus_client adds ``_total``)."""
    source = "\n".join(p.read_text() for p in (ROOT / "sentinel").rglob("*.py"))
    names = {m.group(1) for span in _code_lines() if (m := SERIES.fullmatch(span))}
    assert len(names) > 40
    missing = sorted(
        n for n in names if f'"{n}"' not in source and f'"{n.removesuffix("_total")}"' not in source
    )
    assert not missing, f"README.md names series no code defines: {missing}"
