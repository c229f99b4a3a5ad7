"""The wire codec: strict JSON, safe YAML for stock kiwipy clients, a clear DecodeError for the rest.

No broker needed. A tripwire function in this module stands for ``os.system``: a YAML tag or a
pickle that resolved it would append to ``CALLED``.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import kiwipy.rmq.defaults
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from kiwipy.rmq.messages import BroadcastMessage
from plumpy.process_comms import Intent, MessageBuilder

from brokerexec import codec
from brokerexec.codec import yaml_fallback as codec_yaml
from brokerexec.constants import MAX_JSON_DEPTH, MAX_MESSAGE_BYTES
from brokerexec.errors import DecodeError, MessageTooLarge

CALLED: list[object] = []


def tripwire(*args: object) -> str:
    """What ``!!python/name:os.system`` would reach if a tag were ever resolved."""
    CALLED.append(args)
    return "called"


class PickleBomb:
    """Unpickling this calls the tripwire."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return tripwire, ("from a pickle",)


@pytest.fixture(autouse=True)
def _tripwire_untouched() -> Iterator[None]:
    CALLED.clear()
    yield
    assert CALLED == [], "a tag or pickle in a message ran code"


@pytest.fixture(params=["libyaml", "pure-python"])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run YAML tests with the libyaml-backed loader and with the pure-Python fallback."""
    if request.param == "pure-python":
        monkeypatch.setattr(codec_yaml, "_LOADER", codec_yaml._PyLoader)
    elif not yaml.__with_libyaml__:
        pytest.skip("PyYAML built without libyaml")
    return str(request.param)


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


# ---- round trips -------------------------------------------------------------------------


def test_json_round_trip_is_compact_utf8() -> None:
    value = {"intent": "set", "attrs": {"x": 1.5, "label": "é😀"}, "args": [None, True, -3]}
    body = codec.encode(value)
    assert body == '{"intent":"set","attrs":{"x":1.5,"label":"é😀"},"args":[null,true,-3]}'.encode()
    assert codec.decode(body, codec.JSON) == (value, "json")
    assert codec.decode(body, None) == (value, "json")
    assert codec.decode_object(body, "") == (value, "json")


@pytest.mark.parametrize("content_type", [
    "application/json; charset=utf-8", "Application/JSON", 'application/json; charset="UTF-8"',
    "application/json;charset=utf8"])
def test_json_content_type_parameters(content_type: str) -> None:
    assert codec.decode(b'{"a": 1}', content_type) == ({"a": 1}, "json")


def test_yaml_round_trip_and_content_types() -> None:
    value = {"intent": "status", "message": None, "list": [1, 2.5, "x", {"é": False}]}
    body = codec.encode(value, "yaml")
    assert codec.content_type_for("yaml") == codec.YAML == "application/x-yaml"
    assert codec.content_type_for("json") == codec.JSON == "application/json"
    for content_type in (codec.YAML, "application/yaml", "text/yaml", None):
        assert codec.decode(body, content_type) == (value, "yaml")


def test_a_kiwipy_client_reads_our_yaml_replies() -> None:
    shared = [1, 2]
    body = codec.encode({"a": shared, "b": shared, "t": (1, "x")}, "yaml")
    assert b"&" not in body and b"*" not in body  # no anchors, which our own reader refuses
    expected = {"a": [1, 2], "b": [1, 2], "t": [1, "x"]}
    assert kiwipy.rmq.defaults.DECODER(body) == expected
    assert codec.decode(body, codec.YAML) == (expected, "yaml")


def test_unknown_codec_names_are_a_caller_error() -> None:
    with pytest.raises(ValueError, match="unknown codec 'pickle'"):
        codec.encode({}, "pickle")
    with pytest.raises(ValueError, match="unknown codec"):
        codec.content_type_for("msgpack")


@pytest.mark.parametrize("value", [
    float("nan"), float("inf"), -float("inf"), {1, 2}, object(), b"bytes", "\ud800", {"k": "\udfff"}])
def test_encode_refuses_what_json_cannot_carry(value: object) -> None:
    for name in ("json", "yaml"):
        with pytest.raises(ValueError, match="cannot encode as JSON"):
            codec.encode(value, name)


def test_encode_refuses_cycles_and_depth_the_decoder_would_refuse() -> None:
    cycle: list[object] = []
    cycle.append(cycle)
    with pytest.raises(ValueError, match="cannot encode as JSON"):
        codec.encode(cycle)
    deepest: object = "[[[{not counted}]]]"
    for _ in range(MAX_JSON_DEPTH):
        deepest = [deepest]
    assert codec.decode(codec.encode(deepest), codec.JSON)[0] == deepest
    with pytest.raises(ValueError, match=f"nested deeper than {MAX_JSON_DEPTH}"):
        codec.encode({"a": deepest})


# ---- stock kiwipy and plumpy clients -------------------------------------------------------


def test_stock_kiwipy_rpc_is_read_as_yaml() -> None:
    body = kiwipy.rmq.defaults.ENCODER({"intent": "status", "message": None})
    assert codec.decode(body, None) == ({"intent": "status", "message": None}, "yaml")
    assert codec.decode_object(body, None) == ({"intent": "status", "message": None}, "yaml")


def test_plumpy_broadcasts_are_read_as_yaml() -> None:
    pause_all = BroadcastMessage.create(MessageBuilder.pause(text="maintenance"), subject=Intent.PAUSE)
    expected = {"body": {"intent": "pause", "message": "maintenance"}, "sender": None,
                "subject": "pause", "correlation_id": None}
    assert codec.decode_object(kiwipy.rmq.defaults.ENCODER(pause_all), None) == (expected, "yaml")
    assert codec.decode_object(yaml.dump(pause_all).encode(), None) == (expected, "yaml")
    kill = MessageBuilder.kill("stop", force_kill=True)
    assert codec.decode_object(yaml.dump(kill).encode(), None)[0] == kill


def test_plumpy_state_change_with_a_uuid_sender_is_refused_by_name() -> None:
    # plumpy tags its UUID pids "!uuid": not a JSON type, so refused, saying which tag.
    body = kiwipy.rmq.defaults.ENCODER(BroadcastMessage.create(
        None, sender=uuid.uuid4(), subject="state_changed.running.waiting"))
    with pytest.raises(DecodeError, match="tag !uuid is not accepted"):
        codec.decode(body, None)


# ---- size and content type -----------------------------------------------------------------


def test_size_is_checked_before_anything_else() -> None:
    with pytest.raises(MessageTooLarge, match="message of 11 bytes is over the limit of 10 bytes"):
        codec.decode(b"\x80" * 11, "application/x-python-serialize", max_bytes=10)
    assert codec.decode(b"[1]" + b" " * 7, codec.JSON, max_bytes=10)[0] == [1]
    too_big = b'"' + b"x" * MAX_MESSAGE_BYTES + b'"'
    with pytest.raises(MessageTooLarge, match=f"over the limit of {MAX_MESSAGE_BYTES} bytes"):
        codec.decode(too_big, codec.JSON)
    assert issubclass(MessageTooLarge, DecodeError)


@pytest.mark.parametrize("content_type", [
    "application/x-python-serialize", "application/octet-stream", "text/plain", "application/msgpack"])
def test_other_content_types_are_refused_before_the_body_is_read(content_type: str) -> None:
    for body in (b'{"a": 1}', pickle.dumps(PickleBomb()), b"\x80\x81"):
        with pytest.raises(DecodeError, match=re.escape(
                f"unsupported content type {content_type!r}") + ".*accepts application/json"):
            codec.decode(body, content_type)


def test_pickle_content_type_says_pickle_is_never_decoded() -> None:
    with pytest.raises(DecodeError, match="pickle is never decoded"):
        codec.decode(pickle.dumps(PickleBomb()), "application/x-python-serialize")


def test_charsets_other_than_utf8_are_refused() -> None:
    with pytest.raises(DecodeError, match=r"charset.*UTF-8 only"):
        codec.decode(b'{"a": 1}', "application/json; charset=latin-1")


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickles_without_a_content_type_fail_cleanly(protocol: int) -> None:
    body = pickle.dumps(PickleBomb(), protocol=protocol)
    with pytest.raises(DecodeError):
        codec.decode_object(body, None)


def test_yaml_can_be_turned_off() -> None:
    with pytest.raises(DecodeError, match="invalid JSON") as caught:
        codec.decode(b"a: 1", None, allow_yaml=False)
    assert "YAML" not in str(caught.value)
    with pytest.raises(DecodeError, match="'application/x-yaml' is not accepted here"):
        codec.decode(b"a: 1", codec.YAML, allow_yaml=False)


def test_decode_object_requires_an_object() -> None:
    with pytest.raises(DecodeError, match="expected a JSON object, got list"):
        codec.decode_object(b"[1]", codec.JSON)
    with pytest.raises(DecodeError, match="expected a JSON object, got null"):
        codec.decode_object(b"null", codec.JSON)
    with pytest.raises(DecodeError, match="expected a JSON object, got str"):
        codec.decode_object(b"just words", None)


# ---- strict JSON ---------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "message"), [
    (b"[1, NaN]", "NaN is not valid JSON"),
    (b'{"a": Infinity}', "Infinity is not valid JSON"),
    (b"[-Infinity]", "-Infinity is not valid JSON"),
    (b"[1e400]", "1e400 is out of range"),
    (b"[-1.5e999]", "out of range"),
    (b'{"a": 1, "a": 2}', "duplicate key 'a' in JSON object"),
    (b'{"x": {"b": 1, "c": 2, "b": 3}}', "duplicate key 'b'"),
    (b'"\\ud800"', "lone surrogate"),
    (b'{"\\udfff": 1}', "JSON key .* lone surrogate"),
    (b'["ok", ["\\udc00\\ud800"]]', "lone surrogate"),
    (b'"\\ud83d"', "lone surrogate"),
    (nested(MAX_JSON_DEPTH + 1), f"JSON nested deeper than {MAX_JSON_DEPTH} levels"),
    (b'{"a":' * 65 + b"1" + b"}" * 65, "nested deeper"),
    (b"[" * 100_000, "nested deeper"),
    (nested(100_000), "nested deeper"),
    (b"1" * 5000, "invalid JSON: Exceeds the limit"),
])
def test_strict_json_refusals(body: bytes, message: str) -> None:
    # Refused with and without a content type: a JSON document refused for what it holds is
    # never given a second chance as YAML (where "NaN" would be a string).
    for content_type in (codec.JSON, None):
        with pytest.raises(DecodeError, match=message) as caught:
            codec.decode(body, content_type)
        assert "YAML" not in str(caught.value)


@pytest.mark.parametrize(("body", "message"), [
    (b"\x80\x81", "not valid UTF-8: byte 0x80 at offset 0"),
    (b'"\xc0\xaf"', "not valid UTF-8"),  # overlong "/"
    (b'"\xed\xa0\x80"', "not valid UTF-8"),  # an encoded surrogate (CESU-8)
    (b"{not json", "invalid JSON: Expecting property name"),
    (b'{"a": 1} x', "invalid JSON: Extra data"),
    (b"", "invalid JSON: Expecting value"),
])
def test_malformed_json_with_json_content_type(body: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        codec.decode(body, codec.JSON)


def test_without_content_type_a_body_neither_json_nor_yaml_gets_both_errors() -> None:
    with pytest.raises(DecodeError, match=r"invalid JSON: .*YAML was also tried: .*") as caught:
        codec.decode(b'{"a": [1, 2}', None)
    assert isinstance(caught.value.__cause__, json.JSONDecodeError)


def test_valid_surrogate_pairs_and_bracket_strings_are_fine() -> None:
    assert codec.decode(b'["\\ud83d\\ude00", "\\u00e9"]', codec.JSON)[0] == ["😀", "é"]
    brackets = json.dumps({"text": "[{" * 500, "n": nested(MAX_JSON_DEPTH - 1).decode()}).encode()
    assert codec.decode(brackets, codec.JSON)[0]["text"] == "[{" * 500
    value = json.loads(nested(MAX_JSON_DEPTH))
    assert codec.decode(nested(MAX_JSON_DEPTH), codec.JSON)[0] == value


# ---- safe YAML -----------------------------------------------------------------------------

TAG = f"{__name__}.tripwire"


def test_the_tripwire_is_live() -> None:
    # Control: an unsafe loader given these very bytes would run the tripwire.
    loaded = yaml.load(f"x: !!python/object/apply:{TAG} [1]", Loader=yaml.UnsafeLoader)
    assert loaded == {"x": "called"}
    assert CALLED == [(1,)]
    CALLED.clear()


@pytest.mark.parametrize(("body", "message"), [
    (f"!!python/name:{TAG}".encode(), "unsafe YAML: Python tag !!python/name:.*tripwire is not accepted"),
    (f"x: !!python/object/apply:{TAG} [1]".encode(), "unsafe YAML: Python tag !!python/object/apply:"),
    (f"x: !!python/object/new:{TAG} [1]".encode(), "tag !!python/object/new:"),
    (b"!!python/name:os.system", "unsafe YAML: Python tag !!python/name:os.system is not accepted"),
    (b"!!python/module:os", "!!python/module:os"),
    (b"a: !foo 1", "tag !foo is not accepted"),
    (b"a: &anchor [1]\nb: *anchor", "YAML anchors are not accepted"),
    (b"a: *nowhere", "YAML aliases are not accepted"),
    (b"a: &x 1", "anchors"),
    (b"a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
     b"c: [*b, *b, *b, *b, *b, *b, *b, *b, *b]", "anchors"),
    (b"base: {x: 1}\nb:\n  <<: {y: 2}\n", "tag !!merge"),
    (b"a: 1\na: 2", "duplicate key 'a' in YAML mapping"),
    (b"{1: a, true: b}", "duplicate key"),
    (b"when: 2020-01-01", "value '2020-01-01' with tag !!timestamp"),
    (b"!!set {a, b}", "tag !!set"),
    (b"a: !!binary aGVsbG8=", "tag !!binary"),
    (b"!!omap [a: 1]", "tag !!omap"),
    (b"1: x", "YAML mapping key 1 is not a string"),
    (b"~: x", "YAML mapping key None is not a string"),
    (b"? [1, 2]\n: x", "unhashable key"),
    (b"a: .nan", "NaN and infinities"),
    (b"a: -.inf", "NaN and infinities"),
    (b"a: 1.0e+400", "NaN and infinities"),
    (b'a: "\\ud800"', "surrogate|Unicode"),
    (b'"\\udfff": 1', "surrogate|Unicode"),
    (b"- " * 100_000 + b"x", f"YAML nested deeper than {MAX_JSON_DEPTH} levels"),
    (b"[" * 100_000, "nested deeper"),  # without a content type, JSON refuses it first
    (b"".join(b" " * i + b"k:\n" for i in range(70)) + b" " * 70 + b"1", "YAML nested deeper"),
    (b"a: 1\n---\nb: 2", "expected a single document"),
    (b"", "empty YAML document"),
    (b"a: [1, 2", "invalid or unsafe YAML: .* at line"),
    (b"a: !!bool maybe", "invalid YAML: KeyError"),
    (b'a: !!int ""', "invalid YAML: IndexError"),
    (b"a: !!float '1:2:'", "invalid YAML: ValueError"),
    (b"a: !!seq x", "expected a sequence node, but found scalar"),
])
def test_unsafe_or_non_json_yaml_is_refused(yaml_loader: str, body: bytes, message: str) -> None:
    for content_type in (codec.YAML, None):
        with pytest.raises(DecodeError, match=message):
            codec.decode(body, content_type)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH - 1, MAX_JSON_DEPTH, MAX_JSON_DEPTH + 1])
def test_yaml_depth_limit_matches_json(yaml_loader: str, depth: int) -> None:
    block = "".join("  " * i + "- \n" for i in range(depth - 1)) + "  " * (depth - 1) + "- 1\n"
    for body in (nested(depth), block.encode()):
        if depth <= MAX_JSON_DEPTH:
            assert codec.decode(body, codec.YAML)[1] == "yaml"
        else:
            with pytest.raises(DecodeError, match="nested deeper"):
                codec.decode(body, codec.YAML)


def test_yaml_scalars_resolve_to_json_types(yaml_loader: str) -> None:
    body = b"s: !!str 1\ni: 0x1F\nf: 2.5\nb: yes\nn: ~\nq: 'NaN'\nl: [a, {b: c}]"
    assert codec.decode(body, codec.YAML)[0] == {
        "s": "1", "i": 31, "f": 2.5, "b": True, "n": None, "q": "NaN", "l": ["a", {"b": "c"}]}


@pytest.mark.timeout(20)
def test_large_yaml_mappings_take_linear_time(yaml_loader: str) -> None:
    # A quadratic duplicate-key check took about a minute here; linear takes well under a second.
    body = "".join(f"k{i}: v\n" for i in range(30_000)).encode()
    assert len(codec.decode_object(body, codec.YAML)[0]) == 30_000


def test_the_codec_never_uses_pickle_or_an_unsafe_loader() -> None:
    source = Path(codec.__file__).read_text() + Path(codec_yaml.__file__).read_text()
    assert "import pickle" not in source
    assert not re.search(r"yaml\.(load|unsafe_load|full_load|load_all)\(|UnsafeLoader|FullLoader", source)
    assert issubclass(codec_yaml._LOADER, yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader)


# ---- properties ----------------------------------------------------------------------------

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | _text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=25)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_round_trips(value: object) -> None:
    assert codec.decode(codec.encode(value), codec.JSON) == (value, "json")
    assert codec.decode(codec.encode(value), None) == (value, "json")


@settings(max_examples=150, deadline=None)
@given(json_values)
def test_any_json_value_round_trips_through_yaml(value: object) -> None:
    decoded, name = codec.decode(codec.encode(value, "yaml"), codec.YAML)
    assert name == "yaml"
    assert decoded == value


_content_types = st.sampled_from([None, codec.JSON, codec.YAML])
#: Both YAML loaders; a function-scoped fixture cannot parametrize a hypothesis test.
_loaders = st.sampled_from(sorted({codec_yaml._LOADER, codec_yaml._PyLoader}, key=lambda kind: kind.__name__))


@contextlib.contextmanager
def yaml_loader_set_to(loader: type) -> Iterator[None]:
    saved = codec_yaml._LOADER
    codec_yaml._LOADER = loader
    try:
        yield
    finally:
        codec_yaml._LOADER = saved


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), _content_types, _loaders)
def test_arbitrary_bytes_only_ever_raise_decode_error(body: bytes, content_type: str | None,
                                                      loader: type) -> None:
    with yaml_loader_set_to(loader), contextlib.suppress(DecodeError):
        codec.decode(body, content_type)


# Text made of the characters that drive JSON and YAML parsers, to get past the UTF-8 check.
_syntax = st.text(st.sampled_from(list('[]{}:,-"\'!&*?|>%@#~ \n\t\\u0d8e.+abtrnlsyE\x00\x85')),
                  max_size=120)


_tagged = st.builds("!!{} {}".format, st.sampled_from(
    ["int", "float", "bool", "null", "str", "seq", "map", "binary", "timestamp", "set", "omap"]),
    st.sampled_from(["", "''", "'-'", "_", "0x", "1:2:", ".", "maybe", "[1]", "{a: 1}", "~", "-.inf"]))


@settings(max_examples=800, deadline=None)
@given(_syntax | _tagged | st.builds("a: {}".format, _tagged), _content_types, _loaders)
def test_arbitrary_syntax_only_ever_raises_decode_error(text: str, content_type: str | None,
                                                        loader: type) -> None:
    with yaml_loader_set_to(loader):
        try:
            value, _ = codec.decode(text.encode(), content_type)
        except DecodeError:
            return
    # What gets through is JSON: it re-encodes, and decodes to the same value.
    assert codec.decode(codec.encode(value), codec.JSON)[0] == value
