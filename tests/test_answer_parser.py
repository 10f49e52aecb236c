"""The answer parser never raises, inverts format_answer, and names each malformation precisely,
in the project's keys (bbox / points) and in Qwen2.5-VL's native ones (bbox_2d / point_2d / label)."""

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
     '"points": [[', '"negative_points": ', "null", "true", '"x"', " ", "\n", "<|im_end|>",
     '{"bbox_2d": [', '"point_2d": [', '"label": ']
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
                    lambda c: st.lists(c, max_size=5) | st.dictionaries(st.sampled_from(["bbox", "points", "negative_points", "bbox_2d", "point_2d", "label", "z"]), c, max_size=3),
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
        (_answer('{"bbox_3d": [1, 2, 30, 40]}'), "answer JSON: unknown key 'bbox_3d' (allowed: bbox, points, negative_points; or Qwen2.5-VL's bbox_2d, point_2d, label)"),
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


# ---------------------------------------------------------------- Qwen2.5-VL's native keys


@st.composite
def _native_prompts(draw: st.DrawFn) -> ToolPrompt:
    """A prompt the native keys can say: a box and/or one positive point."""
    prompt = draw(_prompts())
    pos = [p for p, lab in zip(prompt.points, prompt.labels, strict=True) if lab == 1][:1]
    if prompt.box is None and not pos:
        pos = [(draw(_coord_x), draw(_coord_y))]
    return ToolPrompt(box=prompt.box, points=tuple(pos), labels=(1,) * len(pos))


def _native_object(prompt: ToolPrompt, label: str | None) -> dict:
    obj: dict = {}
    if prompt.box is not None:
        obj["bbox_2d"] = list(prompt.box)
    if prompt.points:
        obj["point_2d"] = list(prompt.points[0])
    if label is not None:
        obj["label"] = label
    return obj


@settings(max_examples=200, deadline=None)
@given(
    st.lists(_native_prompts(), min_size=1, max_size=MAX_OBJECTS),
    st.lists(st.none() | st.text(max_size=12), min_size=MAX_OBJECTS, max_size=MAX_OBJECTS),
    st.booleans(),
    st.randoms(use_true_random=False),
)
def test_native_answers_parse_like_the_equivalent_own_answer(
    objects: list[ToolPrompt], labels: list[str | None], as_list: bool, rnd
) -> None:
    native = []
    for prompt, label in zip(objects, labels, strict=False):
        obj = _native_object(prompt, label)
        keys = list(obj)
        rnd.shuffle(keys)  # key order does not matter
        native.append({k: obj[k] for k in keys})
    payload = native if (as_list or len(native) > 1) else native[0]
    parsed = parse_answer(_answer(json.dumps(payload)), SIZE)
    assert parsed.ok, parsed.reason
    own = parse_answer(format_answer(objects), SIZE)
    assert own.ok, own.reason
    assert parsed.objects == own.objects == tuple(objects)


@settings(max_examples=100, deadline=None)
@given(st.lists(_native_prompts(), min_size=1, max_size=MAX_OBJECTS))
def test_format_native_then_parse_round_trips(objects: list[ToolPrompt]) -> None:
    text = format_answer(objects, think="t", style="native")
    assert '"bbox_2d"' in text or '"point_2d"' in text
    assert '"bbox"' not in text and '"points"' not in text
    parsed = parse_answer(text, SIZE)
    assert parsed.ok, parsed.reason
    assert parsed.objects == tuple(objects)


def test_native_answer_as_qwen25vl_writes_it() -> None:
    body = (
        '[{"bbox_2d": [10, 20, 60, 90], "point_2d": [30, 50], "label": "the red ring"}, {"bbox_2d": [70, 5, 110, 40]}]'
    )
    parsed = parse_answer(_answer(body), SIZE)
    assert parsed.ok, parsed.reason
    a, b = parsed.objects
    assert a == ToolPrompt(box=(10, 20, 60, 90), points=((30, 50),), labels=(1,))
    assert b == ToolPrompt(box=(70, 5, 110, 40))
    single = parse_answer(_answer('{"point_2d": [30, 50], "label": ""}'), SIZE)
    assert single.ok and single.objects == (ToolPrompt(points=((30, 50),), labels=(1,)),)
    mixed_list = parse_answer(_answer('[{"bbox_2d": [1, 2, 30, 40]}, {"bbox": [1, 2, 30, 40]}]'), SIZE)
    assert mixed_list.ok and mixed_list.objects[0] == mixed_list.objects[1]  # one style per object, not per list


def test_format_native_refuses_what_the_native_keys_cannot_say() -> None:
    with pytest.raises(ValueError, match="one positive point"):
        format_answer([ToolPrompt(points=((1, 2), (3, 4)), labels=(1, 1))], style="native")
    with pytest.raises(ValueError, match="one positive point"):
        format_answer([ToolPrompt(box=(1, 2, 3, 4), points=((1, 2),), labels=(0,))], style="native")
    with pytest.raises(ValueError, match="style"):
        format_answer([ToolPrompt(box=(1, 2, 3, 4))], style="qwen")
    text = format_answer(
        [ToolPrompt(box=(12.0, 40, 77, 95.0), points=((40.0, 60.0),), labels=(1,))], "t", style="native"
    )
    assert text == '<think>t</think><answer>{"bbox_2d": [12, 40, 77, 95], "point_2d": [40, 60]}</answer>'


NBOX = '"bbox_2d": [1, 2, 30, 40]'


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ('{"bbox_2d": [1, 2, 30]}', "bbox_2d has 3 numbers, expected 4"),
        ('{"bbox_2d": "1, 2, 3, 4"}', "bbox_2d is str, expected a list of 4 numbers"),
        ('{"bbox_2d": [1, "2", 30, 40]}', 'bbox_2d y1 is str "2", expected a number'),
        ('{"bbox_2d": [1, false, 30, 40]}', "bbox_2d y1 is bool false, expected a number"),
        ('{"bbox_2d": [NaN, 2, 30, 40]}', "NaN is not a number"),
        ('{"bbox_2d": [1, 2, 1e999, 40]}', "bbox_2d x2 is not finite"),
        ('{"bbox_2d": [1, 2, 121, 40]}', "bbox_2d x2=121 outside [0, 120]"),
        ('{"bbox_2d": [1, 2, 30, 100.5]}', "bbox_2d y2=100.5 outside [0, 100]"),
        ('{"bbox_2d": [-1, 2, 30, 40]}', "bbox_2d x1=-1 outside [0, 120]"),
        ('{"bbox_2d": [30, 2, 30, 40]}', "bbox_2d has x2=30 <= x1=30 (empty or inverted box)"),
        ('{"bbox_2d": [1, 50, 30, 40]}', "bbox_2d has y2=40 <= y1=50 (empty or inverted box)"),
        ('{"point_2d": 5}', "point_2d is int, expected [x, y]"),
        ('{"point_2d": [1, 2, 3]}', "point_2d is 3 values, expected [x, y]"),
        ('{"point_2d": []}', "point_2d is 0 values, expected [x, y]"),
        ('{"point_2d": [[1, 2]]}', "point_2d is a list of points, expected one point [x, y]"),
        ('{"point_2d": [[1, 2], [3, 4]]}', "point_2d is a list of points, expected one point [x, y]"),
        ('{"point_2d": [1, 101]}', "point_2d y=101 outside [0, 100]"),
        ('{"point_2d": [-0.5, 1]}', "point_2d x=-0.5 outside [0, 120]"),
        ('{"point_2d": [null, 1]}', "point_2d x is NoneType null, expected a number"),
        (f'{{{NBOX}, "label": 7}}', "label is int, expected a string"),
        (f'{{{NBOX}, "label": ["cat"]}}', "label is list, expected a string"),
        ('{"label": "cat"}', "has neither a bbox_2d nor a point_2d"),
        (f'{{{NBOX}, "points": [[5, 6]]}}', "mixes key 'points' with Qwen2.5-VL key 'bbox_2d' (one object uses bbox, points, negative_points or bbox_2d, point_2d, label, not both)"),
        ('{"bbox": [1, 2, 30, 40], "label": "cat"}', "mixes key 'bbox' with Qwen2.5-VL key 'label' (one object uses bbox, points, negative_points or bbox_2d, point_2d, label, not both)"),
        ('{"point_2d": [5, 6], "negative_points": [[7, 8]]}', "mixes key 'negative_points' with Qwen2.5-VL key 'point_2d' (one object uses bbox, points, negative_points or bbox_2d, point_2d, label, not both)"),
        ('{"bbox_2d": [1, 2, 30, 40], "bbox": [1, 2, 30, 40]}', "mixes key 'bbox' with Qwen2.5-VL key 'bbox_2d' (one object uses bbox, points, negative_points or bbox_2d, point_2d, label, not both)"),
        ('{"point_2d": [5, 6], "points_2d": [[7, 8]]}', "unknown key 'points_2d' (allowed: bbox, points, negative_points; or Qwen2.5-VL's bbox_2d, point_2d, label)"),
        (f'[{{{NBOX}}}, {{"bbox_2d": [1, 2]}}]', "object 1: bbox_2d has 2 numbers, expected 4"),
        (f'[{{{NBOX}}}, {{"point_2d": [[1, 2]]}}]', "object 1: point_2d is a list of points, expected one point [x, y]"),
        (f'[{{{NBOX}}}, {{"label": "dog"}}]', "object 1: has neither a bbox_2d nor a point_2d"),
        (json.dumps([{"bbox_2d": [1, 2, 3, 4]}] * (MAX_OBJECTS + 1)), f"{MAX_OBJECTS + 1} objects, more than {MAX_OBJECTS}"),
    ],
)  # fmt: skip
def test_malformed_native_answers_give_precise_reasons(body: str, reason: str) -> None:
    parsed = parse_answer(_answer(body), SIZE)
    assert not parsed.ok
    assert parsed.objects == ()
    assert parsed.reason == f"answer JSON: {reason}"


_BOX_NAMES = ("x1", "y1", "x2", "y2")


@st.composite
def _corrupted_native(draw: st.DrawFn) -> tuple[object, str]:
    """A valid native answer with one thing broken, and the start of the reason that must name it."""
    objects = [_native_object(p, None) for p in draw(st.lists(_native_prompts(), min_size=1, max_size=4))]
    k = draw(st.integers(0, len(objects) - 1))
    obj = objects[k]
    key = draw(st.sampled_from(sorted(obj) + ["label", "mix"]))
    kind = draw(st.sampled_from(["range", "length", "type"]))
    if key == "bbox_2d":
        box = obj["bbox_2d"]
        i = draw(st.integers(0, 3))
        if kind == "range":
            box[i] = draw(st.sampled_from([-1, -0.25])) if draw(st.booleans()) else (W if i % 2 == 0 else H) + 1
            expected = f"bbox_2d {_BOX_NAMES[i]}="
        elif kind == "length":
            del box[i]
            expected = "bbox_2d has 3 numbers, expected 4"
        else:
            box[i] = str(box[i])
            expected = f"bbox_2d {_BOX_NAMES[i]} is str"
    elif key == "point_2d":
        point = obj["point_2d"]
        i = draw(st.integers(0, 1))
        if kind == "range":
            point[i] = (W if i == 0 else H) + 0.5
            expected = f"point_2d {'xy'[i]}="
        elif kind == "length":
            obj["point_2d"] = [point] if draw(st.booleans()) else point + [1]
            expected = "point_2d is a list of points" if len(obj["point_2d"]) == 1 else "point_2d is 3 values"
        else:
            point[i] = None
            expected = f"point_2d {'xy'[i]} is NoneType"
    elif key == "label":
        obj["label"] = draw(st.sampled_from([1, 2.5, None, True, ["a"], {"a": 1}]))
        expected = "label is "
    else:  # one of the project's keys beside the native ones
        own = draw(st.sampled_from(["bbox", "points", "negative_points"]))
        obj[own] = [1, 2, 3, 4] if own == "bbox" else [[1, 2]]
        expected = f"mixes key {own!r} with Qwen2.5-VL key"
    where = f"object {k}: " if len(objects) > 1 else ""
    payload = objects if len(objects) > 1 else objects[0]
    return payload, f"answer JSON: {where}{expected}"


@settings(max_examples=300, deadline=None)
@given(_corrupted_native())
def test_every_malformed_native_variant_is_rejected_naming_the_problem(case: tuple[object, str]) -> None:
    payload, expected = case
    parsed = parse_answer(_answer(json.dumps(payload)), SIZE)
    assert not parsed.ok, payload
    assert parsed.objects == ()
    assert parsed.reason.startswith(expected), (payload, parsed.reason)
