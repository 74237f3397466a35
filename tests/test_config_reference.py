"""The committed config reference (docs/config_reference.md) against the schema it comes from."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path

from dreamr_jax.config import reference
from dreamr_jax.config.schema import Config, ServeConfig, is_config_class

DOC = Path(__file__).resolve().parents[1] / "docs" / "config_reference.md"


def test_committed_reference_is_current():
    assert DOC.read_text(encoding="utf-8") == reference.build(), (
        f"{DOC.name} is stale: regenerate it with `{reference.COMMAND}`"
    )


def _keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted key the loader accepts under `cls`, walked here independently of the
    generator so that a field it skipped would show up."""
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        keys.append(key)
        if is_config_class(hints[f.name]):
            keys += _keys(hints[f.name], key)
    return keys


def test_every_field_is_a_key_of_the_reference():
    text = reference.build()
    for title, root, _ in reference.GROUPS:
        # Config and ServeConfig share key names (`data`, `prompt`, `seed`): look in each section.
        start = text.index(f"## {title}\n")
        end = text.find("\n## ", start + 1)
        part = text[start : end if end >= 0 else len(text)]
        keys = _keys(root)
        assert len(keys) > 20
        missing = [k for k in keys if f"\n| `{k}` |" not in part]
        assert not missing, f"keys missing from the {root.__name__} section: {missing}"
    assert {root for _, root, _ in reference.GROUPS} == {Config, ServeConfig}


@dataclass(frozen=True)
class _Inner:
    """Throwaway inner section."""

    # how many widgets to make
    widgets: int = 7  # at most 9
    names: tuple[str, ...] = ("a|<b>",)  # names "#1" <first> `<x>`; a pipe must not split the cell


@dataclass(frozen=True)
class _Outer:
    """Throwaway root."""

    name: str
    inner: _Inner = field(default_factory=_Inner)
    ratio: float | None = None

    # a blank line above cuts this comment off from the field below

    weights: dict[str, float] = field(default_factory=lambda: {"x": 0.5})
    path: str = field(default="")  # where "" means nowhere


def test_generator_reads_the_source():
    text = reference.build([("Throwaway", _Outer, "a test.")], header="")
    assert "## Throwaway\n\nSet with a test.\n" in text
    assert "### `inner`: `_Inner`\n\nThrowaway inner section.\n" in text
    rows = {line.split(" | ")[0][2:]: line for line in text.splitlines() if line.startswith("| `")}
    assert (
        rows["`inner.widgets`"]
        == "| `inner.widgets` | `int` | `7` | how many widgets to make; at most 9 |"
    )
    assert rows["`inner.names`"] == (
        "| `inner.names` | `tuple[str, ...]` | `('a\\|<b>',)` | "
        'names "#1" &lt;first> `<x>`; a pipe must not split the cell |'
    )
    assert rows["`inner`"] == "| `inner` | `_Inner` | the `inner.*` keys |  |"
    assert rows["`name`"] == "| `name` | `str` | required |  |"
    assert rows["`ratio`"] == "| `ratio` | `float \\| None` | `None` |  |"
    assert rows["`weights`"] == "| `weights` | `dict[str, float]` | `{'x': 0.5}` |  |"
    assert rows["`path`"] == "| `path` | `str` | `''` | where \"\" means nowhere |"
    assert reference.build([("Throwaway", _Outer, "a test.")], header="") == text
