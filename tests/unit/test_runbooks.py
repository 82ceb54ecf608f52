"""runbooks/: one page per alert with the sections an on-call engineer needs, and every
`sentinel ...` command a page shows exists and parses (`--help`)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "runbooks"
SECTIONS = (
    "## Meaning",
    "## User impact",
    "## Dashboard",
    "## Diagnose",
    "## Mitigate",
    "## Preserve evidence",
    "## Escalate",
)
COMMAND = re.compile(r"`(sentinel(?: [^`]*)?)`")


def _alert_pages() -> dict[str, Path]:
    doc = yaml.safe_load((ROOT / "alerts" / "sentinel-rules.yml").read_text())
    return {
        r["alert"]: RUNBOOKS / r["annotations"]["runbook_url"].rsplit("/", 1)[1]
        for g in doc["groups"]
        for r in g["rules"]
        if "alert" in r
    }


def _pages() -> list[Path]:
    return sorted(p for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


def _commands() -> dict[str, list[str]]:
    """Each distinct `sentinel ...` command line shown, without redirections, as argv."""
    out: dict[str, list[str]] = {}
    for page in [*_pages(), RUNBOOKS / "README.md"]:
        for cmd in COMMAND.findall(page.read_text()):
            cmd = re.split(r"\s[>|]", cmd)[0]
            out[cmd] = shlex.split(cmd)[1:]
    return out


def test_every_alert_has_its_page_and_every_page_an_alert() -> None:
    pages = _alert_pages()
    for alert, page in pages.items():
        assert page.is_file(), f"{alert}: {page.name} missing"
        assert alert in page.read_text(), f"{page.name} never names {alert}"
    assert {p.name for p in _pages()} == {p.name for p in pages.values()}, "orphan pages"
    index = (RUNBOOKS / "README.md").read_text()
    for alert in pages:
        assert alert in index, f"runbooks/README.md does not list {alert}"


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.stem)
def test_page_has_every_section_and_diagnosis_starts_with_a_sentinel_command(page: Path) -> None:
    text = page.read_text()
    at = [text.find(s) for s in SECTIONS]
    missing = [s for s, i in zip(SECTIONS, at, strict=True) if i < 0]
    assert not missing, f"{page.name} lacks {missing}"
    assert at == sorted(at), f"{page.name}: sections out of order"
    diagnose = text[text.index("## Diagnose") : text.index("## Mitigate")]
    first = re.search(r"^1\. `([^`]+)`", diagnose, re.M)
    assert first and first.group(1).startswith("sentinel "), f"{page.name}: {diagnose[:200]}"


def test_runbooks_show_commands() -> None:
    subs = {argv[0] for argv in _commands().values() if argv}
    assert {"status", "gpu"} <= subs


@pytest.mark.parametrize("cmd", sorted(_commands()))
def test_every_sentinel_command_shown_exists_and_parses(cmd: str) -> None:
    argv = _commands()[cmd]
    res = subprocess.run(
        [sys.executable, "-m", "sentinel", *argv, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert res.returncode == 0, f"`{cmd} --help` exited {res.returncode}: {res.stderr[-1500:]}"
    assert "Usage" in res.stdout
