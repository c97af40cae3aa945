"""YAML read strictly for experiment configs.

PyYAML's safe loader quietly keeps the last of two equal keys (`train: {lr: 0.1, lr: 0.01}` is
lr 0.01, whichever the author meant), and it expands aliases by reference: a few hundred bytes of
nested aliases (`b: [*a, *a, ...]`, `c: [*b, *b, ...]`) make a value whose printed form has
billions of characters, which one error line would then try to show. Here a duplicate key is an
error naming its dotted path, its lines and the file, and a document whose aliases expand to more
than MAX_VALUES values is refused before anything is built from it.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from pipeline.config.fields import ConfigError

# Values (scalars, lists and mappings) of a document once every alias is expanded. A full config
# is a few hundred; a sweep's grid a few thousand at most.
MAX_VALUES = 100_000
_MERGE = "tag:yaml.org,2002:merge"


def read_yaml(text: str, source: str) -> Any:
    """The plain data of one YAML document (None when it is empty); ConfigError naming `source`
    for a duplicate key or aliases that expand beyond MAX_VALUES. Syntax errors stay
    yaml.YAMLError, for the caller to word."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expanded_size(node, source)
        _check_duplicate_keys(node, [], source)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _children(node: Node) -> list[Node]:
    if isinstance(node, SequenceNode):
        return list(node.value)
    if isinstance(node, MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expanded_size(root: Node, source: str) -> None:
    """Count the values of `root` with aliases expanded, each distinct node once (so the count
    itself stays cheap however large the expansion), and refuse a cycle (`&a [*a]`)."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{source}: line {node.start_mark.line + 1}: an alias refers to "
                              "the value that contains it (a recursive alias); write the value "
                              "out instead")
        open_nodes.add(key)
        total = 1 + sum(size(child) for child in _children(node))
        open_nodes.discard(key)
        if total > MAX_VALUES:
            raise ConfigError(
                f"{source}: its aliases (*name) expand to more than {MAX_VALUES:,} values "
                f"(at line {node.start_mark.line + 1}); a config has a few hundred: write the "
                "values out, or use fewer nested aliases")
        sizes[key] = total
        return total

    size(root)


def _check_duplicate_keys(node: Node, path: list[str], source: str) -> None:
    """ConfigError for a key written twice in one mapping. A merge (`<<: *defaults`) may still
    be overridden by a key of the mapping itself: that is what merging means."""
    if isinstance(node, SequenceNode):
        for i, child in enumerate(node.value):
            _check_duplicate_keys(child, [*path[:-1], f"{path[-1]}[{i}]"] if path
                                  else [f"[{i}]"], source)
        return
    if not isinstance(node, MappingNode):
        return
    seen: dict[tuple[str, str], Node] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE:
            continue
        if isinstance(key_node, ScalarNode):
            key = (key_node.tag, key_node.value)
            if key in seen:
                dotted = ".".join([*path, key_node.value])
                raise ConfigError(
                    f"{source}: duplicate key {_cut(dotted)!r} (lines "
                    f"{seen[key].start_mark.line + 1} and {key_node.start_mark.line + 1}); "
                    "YAML would silently keep the last value: keep one of them")
            seen[key] = key_node
            child_path = [*path, key_node.value]
        else:
            child_path = [*path, "?"]
        _check_duplicate_keys(value_node, child_path, source)


def _cut(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
