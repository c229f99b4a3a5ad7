"""The YAML side of the codec: what stock kiwipy clients send (``yaml.dump``, no content type).

Read with a safe loader made strict: JSON types only, no tags, anchors or aliases, bounded
nesting, no duplicate keys. Imported on first use, so that a one-shot CLI verb, which never
meets YAML, does not pay for importing PyYAML.
"""

from __future__ import annotations

import yaml
from yaml.composer import Composer
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node

from ..constants import MAX_JSON_DEPTH
from ..errors import DecodeError
from .values import check_value

__all__ = ["dump_yaml", "parse_yaml"]

#: The only tags a YAML node may resolve to: the JSON types.
_JSON_TAGS = frozenset(f"tag:yaml.org,2002:{name}"
                       for name in ("null", "bool", "int", "float", "str", "seq", "map"))


class _StrictComposer(Composer, SafeConstructor):
    """The checks that make the safe loader strict, done while the node tree is built.

    Anchors and aliases are refused (no alias bombs, JSON has no shared values); nesting stops
    at ``MAX_JSON_DEPTH`` before it can recurse further; a node that resolves to anything but a
    JSON type (timestamps, sets, binary, merge keys, ``!!python/...``) is refused before any
    constructor sees it; duplicate keys are refused.
    """

    _depth = 0

    def compose_node(self, parent: Node | None, index: object) -> Node | None:
        event = self.peek_event()  # type: ignore[attr-defined]
        if isinstance(event, yaml.AliasEvent):
            raise DecodeError(f"YAML aliases are not accepted (found *{event.anchor})")
        if getattr(event, "anchor", None) is not None:
            raise DecodeError(f"YAML anchors are not accepted (found &{event.anchor})")
        nests = isinstance(event, yaml.SequenceStartEvent | yaml.MappingStartEvent)
        if nests:
            if self._depth >= MAX_JSON_DEPTH:
                raise DecodeError(f"YAML nested deeper than {MAX_JSON_DEPTH} levels")
            self._depth += 1
        try:
            node = super().compose_node(parent, index)  # type: ignore[arg-type]
        finally:
            if nests:
                self._depth -= 1
        if node is not None and node.tag not in _JSON_TAGS:
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            what = f"value {node.value[:40]!r}" if isinstance(node.value, str) else "collection"
            if tag.startswith("!!python/"):
                raise DecodeError(f"unsafe YAML: Python tag {tag} is not accepted (on {what})")
            raise DecodeError(f"YAML {what} with tag {tag} is not accepted: JSON types only")
        return node

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[object, object]:
        mapping: dict[object, object] = super().construct_mapping(node, deep)
        if len(mapping) != len(node.value):  # keys are built by now; find the first repeat
            seen: set[object] = set()
            for key_node, _ in node.value:
                key = self.constructed_objects.get(key_node)
                if key in seen:
                    raise DecodeError(f"duplicate key {key!r} in YAML mapping")
                seen.add(key)
            raise DecodeError("duplicate key in YAML mapping")
        return mapping


class _PyLoader(_StrictComposer, yaml.SafeLoader):
    """The pure-Python safe loader, made strict (PyYAML built without libyaml)."""


if yaml.__with_libyaml__:
    class _CLoader(_StrictComposer, yaml.CSafeLoader):
        """libyaml's scanner and parser under PyYAML's Python composer.

        libyaml's own composer recurses in C without a limit: ``- - - ...`` a hundred thousand
        levels deep crashes the interpreter. The Python composer above stops at the limit.
        """

        def __init__(self, stream: str) -> None:
            yaml.CSafeLoader.__init__(self, stream)
            Composer.__init__(self)


_LOADER: type[_StrictComposer] = _CLoader if yaml.__with_libyaml__ else _PyLoader
_DUMPER: type[yaml.SafeDumper] | type[yaml.CSafeDumper] = (
    yaml.CSafeDumper if yaml.__with_libyaml__ else yaml.SafeDumper)


def parse_yaml(text: str) -> object:
    """Safe, strict YAML, holding JSON types only."""
    loader = None
    try:
        loader = _LOADER(text)  # type: ignore[call-arg]  # the pure-Python reader checks here
        node = loader.get_single_node()
        if node is None:
            raise DecodeError("empty YAML document")
        value = loader.construct_document(node)
    except DecodeError:
        raise
    except yaml.MarkedYAMLError as exc:
        if "maximum nesting depth" in (exc.problem or ""):
            # libyaml >= 0.2.5 (bundled in newer PyYAML wheels) stops its own parser at 1000
            # levels, before our composer's count: one error whichever limit trips first.
            raise DecodeError(f"YAML nested deeper than {MAX_JSON_DEPTH} levels "
                              f"({_yaml_problem(exc)})") from exc
        raise DecodeError(f"invalid or unsafe YAML: {_yaml_problem(exc)}") from exc
    except Exception as exc:
        # PyYAML's constructors were not written for hostile input: ``!!int ""`` raises
        # IndexError, ``!!bool maybe`` KeyError. Whatever fails in them, the body is bad.
        raise DecodeError(f"invalid YAML: {type(exc).__name__}: {exc}") from exc
    finally:
        if loader is not None:
            loader.dispose()  # type: ignore[attr-defined]
    check_value(value, "YAML")
    return value


def _yaml_problem(exc: yaml.MarkedYAMLError) -> str:
    """PyYAML's multi-line message on one line: what was wrong, and where."""
    what = ", ".join(part for part in (exc.context, exc.problem) if part)
    mark = exc.problem_mark or exc.context_mark
    return f"{what} at line {mark.line + 1} column {mark.column + 1}" if mark else what


def dump_yaml(value: object) -> bytes:
    """YAML of a JSON-normalised value, for replies to kiwipy clients."""
    return yaml.dump(value, Dumper=_DUMPER, encoding="utf-8")
