"""The docs stay true: the config reference lists exactly the config's keys, with their defaults."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from plait.config import Config

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_config_reference_lists_every_key():
    text = (DOCS / "config.md").read_text()
    documented = dict(re.findall(r"^\| `(\w+\.\w+)` \| ([^|]+) \|", text, flags=re.MULTILINE))
    cfg = Config()
    keys = {}
    for section in dataclasses.fields(cfg):
        for f in dataclasses.fields(getattr(cfg, section.name)):
            keys[f"{section.name}.{f.name}"] = getattr(getattr(cfg, section.name), f.name)
    assert set(documented) == set(keys), set(documented) ^ set(keys)
    for key, default in keys.items():
        if default is None:
            continue  # comes from the named size
        shown = documented[key].strip().strip("`")
        if isinstance(default, bool):
            assert shown == str(default).lower(), key
        elif isinstance(default, str):
            assert shown == f'"{default}"', key
        else:
            assert float(shown) == float(default), key


ROOT = DOCS.parent
PARALLELISM_PAGES = ["data_parallel.md", "zero.md", "tensor_parallel.md"]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _prose(text: str) -> str:
    """The text without fenced code blocks (their brackets are code, not links)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    return {_anchor(h) for h in re.findall(r"^#+ (.+)$", _prose(page.read_text()), flags=re.MULTILINE)}


def test_relative_links_resolve():
    """Every relative link in the README and docs/ names a file that exists (and a heading in it)."""
    broken = []
    for page in [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]:
        for target in LINK.findall(_prose(page.read_text())):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_readme_links_every_docs_page():
    linked = set(LINK.findall((ROOT / "README.md").read_text()))
    assert {f"docs/{page.name}" for page in DOCS.glob("*.md")} <= linked


def test_parallelism_pages_share_their_sections():
    """One page per parallelism, each with the same sections in the same order, linked from the
    parallel overview."""
    overview = set(LINK.findall((DOCS / "parallel.md").read_text()))
    sections = {}
    for name in PARALLELISM_PAGES:
        assert name in overview, f"parallel.md does not link {name}"
        sections[name] = re.findall(r"^## (.+)$", _prose((DOCS / name).read_text()), flags=re.MULTILINE)
    assert sections[PARALLELISM_PAGES[0]] == [
        "What it shards", "Collectives per step", "Memory per rank", "Turning it on",
        "What it does not combine with", "How it is tested",
    ]
    for name in PARALLELISM_PAGES[1:]:
        assert sections[name] == sections[PARALLELISM_PAGES[0]], name
