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
