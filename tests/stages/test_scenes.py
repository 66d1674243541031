"""The generated scenes are deterministic, and every caption and answer is true of the pixels:
objects are read back from the decoded PNG (colour by exact RGB, shape by its silhouette) and
the texts are checked against what was read, not against the generator's own objects."""

from __future__ import annotations

import random
import re
from collections import Counter

import numpy as np
import pytest

from ernie.presets import tiny_vl
from stages.data.scenes import COLOURS, POSITIONS, SHAPES, Scene, caption, generate_scenes, questions, scene_documents
from stages.imaging import decode_image, image_to_patches, image_token_count

SINGULAR = {plural: shape for shape, plural in SHAPES.items()}
COUNT_WORDS = {"a": 1, "an": 1, "two": 2, "three": 3, "four": 4}
RGB_TO_COLOUR = {rgb: name for name, rgb in COLOURS.items()}


# ---------------------------------------------------------------------- reading pixels
def classify_silhouette(mask_HW: np.ndarray) -> str:
    """Shape name from the filled pixels of one shape, cropped to their bounding box."""
    rows, cols = np.nonzero(mask_HW)
    box = mask_HW[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    height, width = box.shape
    top, middle, bottom = box[0].sum(), box[height // 2].sum(), box[-1].sum()
    assert abs(height - width) <= 1, "shapes are drawn in square boxes"
    if box.mean() > 0.95:
        return "square"
    if bottom == width and top < width / 4:
        return "triangle"
    assert middle == width and top < width and bottom < width, "unrecognised silhouette"
    return "circle" if box.mean() > 0.65 else "diamond"


def objects_in_pixels(scene: Scene) -> dict[str, tuple[str, str]]:
    """{position: (colour, shape)} read from the decoded PNG, one 3x3 grid cell at a time."""
    pixels_HWC = np.asarray(decode_image(scene.png, "scene.png"))
    assert pixels_HWC.shape == (scene.height, scene.width, 3)
    found = {}
    for row, names in enumerate(POSITIONS):
        for col, position in enumerate(names):
            top, bottom = row * scene.height // 3, (row + 1) * scene.height // 3
            left, right = col * scene.width // 3, (col + 1) * scene.width // 3
            cell_HWC = pixels_HWC[top:bottom, left:right]
            foreground = (cell_HWC != scene.background).any(axis=-1)
            if not foreground.any():
                continue
            colours = {tuple(int(v) for v in rgb) for rgb in cell_HWC[foreground]}
            assert len(colours) == 1, f"{position}: more than one colour {colours}"
            centre = tuple(int(v) for v in cell_HWC[(bottom - top) // 2, (right - left) // 2])
            assert centre == colours.pop(), f"{position}: the cell centre is not inside the shape"
            found[position] = (RGB_TO_COLOUR[centre], classify_silhouette(foreground))
    return found


def parse_caption(text: str) -> dict[tuple[str, str], set[str]]:
    """{(colour, shape): positions} from "a red circle at the top left, and two blue squares at ..."."""
    groups = {}
    for phrase in re.split(r",? and (?=(?:a|an|two|three|four) )|, (?=(?:a|an|two|three|four) )", text):
        match = re.fullmatch(r"(a|an|two|three|four) (\w+) (\w+) at (.+)", phrase)
        assert match, f"caption phrase {phrase!r} of {text!r}"
        count, colour, noun, places = match.groups()
        positions = {p.removeprefix("the ") for p in re.split(r", | and ", places)}
        shape = noun if COUNT_WORDS[count] == 1 else SINGULAR[noun]
        assert len(positions) == COUNT_WORDS[count], f"{phrase!r}: count word and places disagree"
        groups[(colour, shape)] = positions
    return groups


def true_answer(question: str, found: dict[str, tuple[str, str]]) -> str:
    """The answer to one generated question, worked out from the objects read from the pixels."""
    kinds = Counter(found.values())
    if question == "How many shapes are there?":
        return str(len(found))
    if match := re.fullmatch(r"How many (\w+) (\w+) are there\?", question):
        return str(kinds[(match[1], SINGULAR[match[2]])])
    if match := re.fullmatch(r"How many (\w+) are there\?", question):
        return str(sum(shape == SINGULAR[match[1]] for _, shape in found.values()))
    if match := re.fullmatch(r"What colour is the (\w+) at the (.+)\?", question):
        colour, shape = found[match[2]]
        assert shape == match[1]
        return colour
    if match := re.fullmatch(r"What is at the (.+)\?", question):
        if match[1] not in found:
            return "nothing"
        colour, shape = found[match[1]]
        return f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}"
    if match := re.fullmatch(r"Where is the (\w+) (\w+)\?", question):
        places = [p for p, kind in found.items() if kind == (match[1], match[2])]
        assert len(places) == 1, f"{question!r} is ambiguous"
        return f"at the {places[0]}"
    raise AssertionError(f"unknown question form {question!r}")


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    return generate_scenes(60, random.Random(11))


# ---------------------------------------------------------------------- tests
def test_same_seed_gives_identical_scenes_and_texts():
    first, second = generate_scenes(12, random.Random(5)), generate_scenes(12, random.Random(5))
    assert [s.png for s in first] == [s.png for s in second]
    assert first == second
    assert scene_documents(first, random.Random(6)) == scene_documents(second, random.Random(6))
    assert [questions(s, random.Random(7)) for s in first] == [questions(s, random.Random(7)) for s in second]
    assert [s.png for s in generate_scenes(12, random.Random(4))] != [s.png for s in first]


def test_objects_in_the_pixels_are_the_stated_objects(scenes):
    for scene in scenes:
        found = objects_in_pixels(scene)
        assert found == {obj.position: obj.kind for obj in scene.objects}
        assert 1 <= len(found) <= 4


def test_captions_describe_the_pixels(scenes):
    for scene in scenes:
        found = objects_in_pixels(scene)
        expected: dict[tuple[str, str], set[str]] = {}
        for position, kind in found.items():
            expected.setdefault(kind, set()).add(position)
        assert parse_caption(caption(scene)) == expected, caption(scene)


def test_answers_are_true_of_the_pixels(scenes):
    rng = random.Random(12)
    asked = Counter()
    for scene in scenes:
        found = objects_in_pixels(scene)
        for question, answer in questions(scene, rng):
            assert answer == true_answer(question, found), question
            asked[question.split()[0] + " " + question.split()[1]] += 1
    assert set(asked) == {"How many", "What colour", "What is", "Where is"}


def test_scenes_vary_enough_to_teach_counting_and_colours(scenes):
    kinds = Counter(obj.kind for scene in scenes for obj in scene.objects)
    assert {shape for _, shape in kinds} == set(SHAPES)
    assert {colour for colour, _ in kinds} == set(COLOURS)
    repeated = [scene for scene in scenes if len({obj.kind for obj in scene.objects}) < len(scene.objects)]
    assert repeated, "no scene repeats a kind, so no count answer is above 1"
    assert {len(scene.objects) for scene in scenes} == {1, 2, 3, 4}


def test_scenes_turn_into_4_to_16_image_tokens(scenes):
    vision = tiny_vl().vision
    for scene in scenes[:10]:
        image = decode_image(scene.png, "scene.png")
        patches, grid = image_to_patches(image, vision, 56 * 56, 112 * 112)
        # sides are multiples of 28, so the processor keeps the pixels as drawn
        assert grid == (1, scene.height // 14, scene.width // 14)
        assert patches.shape == (scene.height * scene.width // 196, vision.patch_dim)
        assert 4 <= image_token_count(grid, vision) <= 16


def test_documents_interleave_images_and_true_texts(scenes):
    documents = scene_documents(scenes[:20], random.Random(13))
    assert len(documents) == 40
    for index, document in enumerate(documents):
        scene = scenes[index // 2]
        assert all(set(seg) in ({"type", "text"}, {"type", "image"}) for seg in document)
        assert [seg["image"] for seg in document if seg["type"] == "image"] == [scene.png]
        texts = [seg["text"] for seg in document if seg["type"] == "text"]
        assert all(isinstance(t, str) and t for t in texts)
        if index % 2:  # the Q&A document
            assert texts[0] == "Picture:" and document[1]["type"] == "image"
            found = objects_in_pixels(scene)
            pairs = [re.fullmatch(r"Q: (.+\?) A: (.+)", line) for line in texts[1].split("\n")]
            assert 2 <= len(pairs) <= 3 and all(pairs), texts[1]
            for pair in pairs:
                assert pair[2] == true_answer(pair[1], found)
        else:
            assert caption(scene)[1:] in texts[0]  # a template may capitalise the first letter


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="-1"):
        generate_scenes(-1, random.Random(0))
    with pytest.raises(ValueError, match="without objects"):
        questions(Scene((), b"", 56, 56, (255, 255, 255)), random.Random(0))
