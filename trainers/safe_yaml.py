"""The one YAML reader for everything a user hands us: training configs, `KEY=VALUE` overrides, search spaces.

Safe loading only (plain scalars, lists and mappings; no tags that build objects), with three changes:
- `1e-3` (no dot) is a float, as in YAML 1.2; YAML 1.1 would read it as a string.
- a key repeated in one mapping is an error, not last-wins (a duplicated param would silently vanish);
- aliases (`*name`) are refused: a few nested aliases expand to billions of nodes once anything walks or
  prints the tree, and no config needs them.
Bounded before work: a file is a regular file of at most 1 MiB (checked by `stat` before reading), nesting
is at most 50 levels (the composer recurses), an override at most 10,000 characters.
Every problem (missing file, not UTF-8, malformed YAML) is one ConfigError line naming the source.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError
from .input_files import MAX_NESTING, read_text


MAX_YAML_BYTES = 2**20  # configs and spaces are a few KB; checked before reading, so a huge file costs nothing
MAX_OVERRIDE_CHARS = 10_000


class _Loader(yaml.SafeLoader):
    depth = 0

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not supported", mark)
        self.depth += 1  # PyYAML composes recursively: refuse deep nesting before Python's stack runs out
        try:
            if self.depth > MAX_NESTING:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nesting deeper than {MAX_NESTING} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):
                raise yaml.constructor.ConstructorError(None, None, "a mapping key must be a scalar",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text; a syntax problem is one ConfigError line naming `source` and the position."""
    try:
        # _Loader is a yaml.SafeLoader: only plain scalars, lists and mappings are built, and a tag such as
        # !!python/object/apply is a YAMLError (tests/test_hostile_input.py::test_malformed_config_files).
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {_one_line(e)}") from None


def read_yaml_file(path: str | Path, what: str = "config file") -> Any:
    """A regular file of at most MAX_YAML_BYTES (a FIFO or a 200 MB file is refused before reading)."""
    return parse_yaml(read_text(path, MAX_YAML_BYTES, what), str(path))


def _one_line(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None) or str(e)
    mark = getattr(e, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return " ".join(f"{problem}{where}".split())
