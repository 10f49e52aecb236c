"""The answer parser never raises, inverts format_answer, and names each malformation precisely."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from verl_grto.reward.answer import (
    MAX_ANSWER_CHARS,
    MAX_OBJECTS,
    MAX_POINTS,
    MAX_TEXT_CHARS,
    ToolPrompt,
    format_answer,
    parse_answer,
)

H, W = 100, 120  # image_size is (height, width)
SIZE = (H, W)


def _answer(body: str, think: str = "<think>ok</think>") -> str:
    return f"{think}<answer>{body}</answer>"


# ---------------------------------------------------------------- never raises

_fragments = st.sampled_from(
    ["<think>", "</think>", "<answer>", "</answer>", '{"bbox": [', "]", "[", "}", ",", "1", "-3", "1e999", "NaN",
     '"points": [[', '"negative_points": ', "null", "true", '"x"', " ", "\n", "<|im_end|>"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.lists(_fragments, max_size=40).map("".join)))
def test_arbitrary_text_never_raises(text: str) -> None:
    parsed = parse_answer(text, SIZE)
    assert isinstance(parsed.reason, str)
    assert not parsed.reason.startswith("internal"), parsed.reason
    assert parsed.ok == (parsed.reason == "")
    assert parsed.ok or parsed.objects == ()


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.sampled_from(["bbox", "points", "negative_points", "z"]), c, max_size=3),
                    max_leaves=20))  # fmt: skip
def test_arbitrary_json_never_raises(value: object) -> None:
    parsed = parse_answer(_answer(json.dumps(value)), SIZE)
    assert not parsed.reason.startswith("internal"), parsed.reason
    if parsed.ok:  # whatever was accepted is inside the image and well-formed
        for obj in parsed.objects:
            if obj.box is not None:
                x1, y1, x2, y2 = obj.box
                assert 0 <= x1 < x2 <= W and 0 <= y1 < y2 <= H
            assert all(0 <= x <= W and 0 <= y <= H for x, y in obj.points)


def test_non_string_input_is_rejected_not_raised() -> None:
    parsed = parse_answer(None, SIZE)  # type: ignore[arg-type]
    assert not parsed.ok and "NoneType" in parsed.reason


# ---------------------------------------------------------------- round trip

_coord_x = st.one_of(st.integers(0, W), st.floats(0, W, allow_nan=False, allow_infinity=False))
_coord_y = st.one_of(st.integers(0, H), st.floats(0, H, allow_nan=False, allow_infinity=False))


@st.composite
def _prompts(draw: st.DrawFn) -> ToolPrompt:
    box = None
    if draw(st.booleans()):
        x1, x2 = sorted(draw(st.lists(_coord_x, min_size=2, max_size=2, unique=True).filter(lambda v: v[0] != v[1])))
        y1, y2 = sorted(draw(st.lists(_coord_y, min_size=2, max_size=2, unique=True).filter(lambda v: v[0] != v[1])))
        box = (x1, y1, x2, y2)
    n_pos = draw(st.integers(0 if box is not None else 1, 3))
    n_neg = draw(st.integers(0, 3))
    points = tuple((draw(_coord_x), draw(_coord_y)) for _ in range(n_pos + n_neg))
    return ToolPrompt(box=box, points=points, labels=(1,) * n_pos + (0,) * n_neg)


@settings(max_examples=200, deadline=None)
@given(st.lists(_prompts(), min_size=1, max_size=MAX_OBJECTS), st.text(max_size=40).filter(lambda t: "<" not in t))
def test_format_then_parse_round_trips(objects: list[ToolPrompt], think: str) -> None:
    parsed = parse_answer(format_answer(objects, think=think), SIZE)
    assert parsed.ok, parsed.reason
    assert parsed.has_think
    assert parsed.objects == tuple(objects)


def test_format_writes_integers_without_decimals() -> None:
    text = format_answer([ToolPrompt(box=(12.0, 40, 77, 95.0), points=((40.0, 60.0),), labels=(1,))], think="t")
    assert text == '<think>t</think><answer>{"bbox": [12, 40, 77, 95], "points": [[40, 60]]}</answer>'
    text = format_answer([ToolPrompt(box=(1.5, 2, 3, 4))])
    assert '"bbox": [1.5, 2, 3, 4]' in text


def test_format_rejects_what_it_cannot_write() -> None:
    with pytest.raises(ValueError):
        format_answer([])
    with pytest.raises(ValueError):
        format_answer([ToolPrompt(box=(1, 2, 3, 4))], think="a</think>b")
    with pytest.raises(ValueError):
        format_answer([ToolPrompt(points=((1, 2),), labels=(0,))])  # only a negative point
    with pytest.raises(ValueError):
        format_answer([ToolPrompt(box=(float("nan"), 2, 3, 4))])


def test_multi_object_and_negative_points_parse() -> None:
    body = json.dumps([{"bbox": [1, 2, 30, 40], "points": [[5, 6]], "negative_points": [[7, 8]]}, {"points": [[9, 9]]}])
    parsed = parse_answer(_answer(body), SIZE)
    assert parsed.ok, parsed.reason
    a, b = parsed.objects
    assert a.box == (1, 2, 30, 40) and a.points == ((5, 6), (7, 8)) and a.labels == (1, 0)
    assert b.box is None and b.points == ((9, 9),) and b.labels == (1,)


# ---------------------------------------------------------------- think / tags


@pytest.mark.parametrize(
    ("text", "has_think"),
    [
        (_answer('{"bbox": [1, 2, 3, 4]}'), True),
        ('  <think>\nmulti\nline</think>\n <answer>{"bbox": [1, 2, 3, 4]}</answer>\n<|im_end|>', True),
        (_answer('{"bbox": [1, 2, 3, 4]}', think=""), False),
        (_answer('{"bbox": [1, 2, 3, 4]}', think="chatter <think>x</think>"), False),
        (_answer('{"bbox": [1, 2, 3, 4]}', think="<think>a<think>b</think>"), False),
    ],
)
def test_think_block_detection(text: str, has_think: bool) -> None:
    parsed = parse_answer(text, SIZE)
    assert parsed.ok, parsed.reason
    assert parsed.has_think is has_think


# ---------------------------------------------------------------- precise reasons

BOX = '{"bbox": [1, 2, 30, 40]}'


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<think>x</think>", "no <answer> tag"),
        (f"<think>x</think><answer>{BOX}", "no </answer> closing tag (truncated?)"),
        (f"<answer>{BOX}</answer><answer>{BOX}</answer>", "2 <answer> tags, expected 1"),
        (f"</answer><answer>{BOX}", "</answer> comes before <answer>"),
        (f"<answer>{BOX}</answer> and more", "text after </answer>: 'and more'"),
        (_answer("   "), "answer is empty"),
        (_answer('{"bbox": [1, 2, 30, 40]'), "answer JSON: invalid (Expecting ',' delimiter at char 23)"),
        (_answer('"a box"'), "answer JSON: top level is str, expected an object or a list of objects"),
        (_answer("[]"), "answer JSON: empty list of objects"),
        (_answer('{"bbox": [1, 2, 30]}'), "answer JSON: bbox has 3 numbers, expected 4"),
        (_answer('{"bbox": "1, 2, 3, 4"}'), "answer JSON: bbox is str, expected a list of 4 numbers"),
        (_answer('{"bbox": [1, "2", 30, 40]}'), 'answer JSON: bbox y1 is str "2", expected a number'),
        (_answer('{"bbox": [1, true, 30, 40]}'), "answer JSON: bbox y1 is bool true, expected a number"),
        (_answer('{"bbox": [NaN, 2, 30, 40]}'), "answer JSON: NaN is not a number"),
        (_answer('{"bbox": [1, 2, Infinity, 40]}'), "answer JSON: Infinity is not a number"),
        (_answer('{"bbox": [1, 2, 1e999, 40]}'), "answer JSON: bbox x2 is not finite"),
        (_answer('{"bbox": [1, 2, 121, 40]}'), "answer JSON: bbox x2=121 outside [0, 120]"),
        (_answer('{"bbox": [1, 2, 30, 100.5]}'), "answer JSON: bbox y2=100.5 outside [0, 100]"),
        (_answer('{"bbox": [-1, 2, 30, 40]}'), "answer JSON: bbox x1=-1 outside [0, 120]"),
        (_answer('{"bbox": [30, 2, 30, 40]}'), "answer JSON: bbox has x2=30 <= x1=30 (empty or inverted box)"),
        (_answer('{"bbox": [1, 50, 30, 40]}'), "answer JSON: bbox has y2=40 <= y1=50 (empty or inverted box)"),
        (_answer('{"bbox_2d": [1, 2, 30, 40]}'), "answer JSON: unknown key 'bbox_2d' (allowed: bbox, points, negative_points)"),
        (_answer("{}"), "answer JSON: has neither a bbox nor positive points"),
        (_answer('{"negative_points": [[1, 1]]}'), "answer JSON: has neither a bbox nor positive points"),
        (_answer('{"points": [1, 2]}'), "answer JSON: points[0] is int, expected [x, y]"),
        (_answer('{"points": [[1, 2, 3]]}'), "answer JSON: points[0] is 3 values, expected [x, y]"),
        (_answer('{"points": [[1, 101]]}'), "answer JSON: points[0] y=101 outside [0, 100]"),
        (_answer('{"points": {"x": 1}}'), "answer JSON: points is dict, expected a list of [x, y]"),
        (_answer('[{"bbox": [1, 2, 30, 40]}, 7]'), "answer JSON: object 1: is int, expected an object like {\"bbox\": [...]}"),
        (_answer('[{"bbox": [1, 2, 30, 40]}, {"bbox": [1, 2]}]'), "answer JSON: object 1: bbox has 2 numbers, expected 4"),
        (_answer("[" * 2000 + "]" * 2000), "answer JSON: nested too deeply"),
    ],
)  # fmt: skip
def test_malformed_answers_give_precise_reasons(text: str, reason: str) -> None:
    parsed = parse_answer(text, SIZE)
    assert not parsed.ok
    assert parsed.objects == ()
    assert parsed.reason == reason


def test_caps() -> None:
    too_many_objects = json.dumps([{"bbox": [1, 2, 3, 4]}] * (MAX_OBJECTS + 1))
    assert (
        parse_answer(_answer(too_many_objects), SIZE).reason
        == f"answer JSON: {MAX_OBJECTS + 1} objects, more than {MAX_OBJECTS}"
    )
    too_many_points = json.dumps({"points": [[1, 1]] * (MAX_POINTS + 1)})
    assert (
        parse_answer(_answer(too_many_points), SIZE).reason
        == f"answer JSON: points has {MAX_POINTS + 1} points, more than {MAX_POINTS}"
    )
    split_points = json.dumps({"points": [[1, 1]] * MAX_POINTS, "negative_points": [[2, 2]]})
    assert (
        parse_answer(_answer(split_points), SIZE).reason
        == f"answer JSON: has {MAX_POINTS + 1} points, more than {MAX_POINTS}"
    )
    long_body = '{"bbox": [1, 2, 3, 4]' + " " * MAX_ANSWER_CHARS + "}"
    assert (
        parse_answer(_answer(long_body), SIZE).reason
        == f"answer has {len(long_body)} characters, more than {MAX_ANSWER_CHARS}"
    )
    long_text = "x" * MAX_TEXT_CHARS + _answer(BOX)
    assert parse_answer(long_text, SIZE).reason.startswith(f"response has {len(long_text)} characters")
    huge_int = '{"bbox": [1, 2, ' + "9" * 400 + ", 4]}"
    assert parse_answer(_answer(huge_int), SIZE).reason == "answer JSON: bbox x2 is too large"


def test_coordinates_on_the_border_are_accepted() -> None:
    parsed = parse_answer(_answer(json.dumps({"bbox": [0, 0, W, H], "points": [[W, H], [0, 0]]})), SIZE)
    assert parsed.ok, parsed.reason
    assert parsed.objects[0].box == (0, 0, W, H)


def test_image_size_is_height_then_width() -> None:
    wide = _answer('{"bbox": [0, 0, 110, 20]}')  # x2=110 fits a width of 120 but not a width of 100
    assert parse_answer(wide, (100, 120)).ok
    assert not parse_answer(wide, (120, 100)).ok
