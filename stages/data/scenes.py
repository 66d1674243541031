"""Generated scenes: the bundled image corpus, whose every caption and answer is known.

Nothing can be downloaded, so the tiny VL pipeline draws its own pictures: 1-4 flat shapes
in named colours, each in its own cell of a 3x3 grid, on a plain pale background, 56-112 px
a side (4-16 language-model tokens at patch 14 / merge 2). Shapes are drawn without
anti-aliasing and saved as PNG, so every pixel of a shape has exactly its named colour and
the same seed gives byte-identical files. Captions and question answers are computed from
the objects, never written by hand.
"""

from __future__ import annotations

import io
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image, ImageDraw

SHAPES = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
"""Shape name -> plural."""
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 20),
}
BACKGROUNDS = ((255, 255, 255), (228, 228, 228), (250, 240, 215))
"""Pale backgrounds, none of them a named colour."""
POSITIONS = (
    ("top left", "top middle", "top right"),
    ("middle left", "centre", "middle right"),
    ("bottom left", "bottom middle", "bottom right"),
)
"""Position names of the 3x3 grid cells, [row][column]."""
SIDES = (56, 84, 112)
"""Image side lengths: multiples of 28, so the processor keeps the pixels unresized."""
MAX_OBJECTS = 4
SHAPE_FILL = 0.7
"""A shape's side as a fraction of its cell's shorter side (the rest keeps cells apart)."""
REPEAT_KIND = 1 / 3
"""Chance that an object repeats an earlier object's colour and shape, so counts above 1 occur."""
NUMBER_WORDS = ("no", "one", "two", "three", "four")
QA_PER_DOCUMENT = (2, 3)
CAPTION_TEMPLATES = ("{caption}.", "This picture shows {caption}.", "In this image there is {caption}.")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    position: str

    @property
    def kind(self) -> tuple[str, str]:
        return self.colour, self.shape


@dataclass(frozen=True)
class Scene:
    """One picture: its objects in reading order of their cells, and the PNG that draws them."""

    objects: tuple[SceneObject, ...]
    png: bytes
    width: int
    height: int
    background: tuple[int, int, int]


def _cell(position: str) -> tuple[int, int]:
    for row, names in enumerate(POSITIONS):
        if position in names:
            return row, names.index(position)
    raise ValueError(f"unknown position {position!r}; known: {[p for row in POSITIONS for p in row]}")


def _reading_order() -> list[str]:
    return [name for row in POSITIONS for name in row]


def shape_outline(shape: str, box: tuple[int, int, int, int]) -> list[tuple[int, int]]:
    """Polygon corners of a square / triangle (apex up) / diamond inside `box` (left, top, right, bottom)."""
    left, top, right, bottom = box
    mid_x, mid_y = (left + right) // 2, (top + bottom) // 2
    outlines = {
        "square": [(left, top), (right, top), (right, bottom), (left, bottom)],
        "triangle": [(mid_x, top), (right, bottom), (left, bottom)],
        "diamond": [(mid_x, top), (right, mid_y), (mid_x, bottom), (left, mid_y)],
    }
    return outlines[shape]


def object_box(position: str, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the square a shape fills, centred in its grid cell."""
    row, col = _cell(position)
    centre_x, centre_y = round((col + 0.5) * width / 3), round((row + 0.5) * height / 3)
    half = int(SHAPE_FILL * min(width, height) / 3) // 2
    return centre_x - half, centre_y - half, centre_x + half, centre_y + half


def draw_scene(objects: tuple[SceneObject, ...], width: int, height: int, background: tuple[int, int, int]) -> bytes:
    """PNG bytes of the objects on a plain background (no anti-aliasing: colours stay exact)."""
    image = Image.new("RGB", (width, height), background)
    pen = ImageDraw.Draw(image)
    for obj in objects:
        box = object_box(obj.position, width, height)
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            pen.ellipse(box, fill=fill)
        else:
            pen.polygon(shape_outline(obj.shape, box), fill=fill)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _random_objects(rng: random.Random) -> tuple[SceneObject, ...]:
    count = rng.randint(1, MAX_OBJECTS)
    cells = set(rng.sample(_reading_order(), count))
    kinds: list[tuple[str, str]] = []
    objects = []
    for position in (p for p in _reading_order() if p in cells):
        if kinds and rng.random() < REPEAT_KIND:
            colour, shape = rng.choice(kinds)
        else:
            colour, shape = rng.choice(sorted(COLOURS)), rng.choice(sorted(SHAPES))
        kinds.append((colour, shape))
        objects.append(SceneObject(shape, colour, position))
    return tuple(objects)


def generate_scenes(count: int, rng: random.Random) -> list[Scene]:
    """`count` random scenes; the same `rng` state gives the same scenes and PNG bytes."""
    if count < 0:
        raise ValueError(f"scene count must be >= 0, got {count}")
    scenes = []
    for _ in range(count):
        width, height = rng.choice(SIDES), rng.choice(SIDES)
        background = rng.choice(BACKGROUNDS)
        objects = _random_objects(rng)
        scenes.append(Scene(objects, draw_scene(objects, width, height, background), width, height, background))
    return scenes


# ---------------------------------------------------------------------- language
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _noun_phrase(colour: str, shape: str, count: int) -> str:
    if count == 1:
        return f"{_article(colour)} {colour} {shape}"
    return f"{NUMBER_WORDS[count]} {colour} {SHAPES[shape]}"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def caption(scene: Scene) -> str:
    """What the scene shows, e.g. "a red circle at the top left and two blue squares at the centre and the
    bottom right".

    Objects of the same colour and shape are grouped; groups follow the reading order of
    their first cell.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for obj in scene.objects:
        groups.setdefault(obj.kind, []).append(obj.position)
    phrases = [
        f"{_noun_phrase(colour, shape, len(places))} at {_join([f'the {p}' for p in places])}"
        for (colour, shape), places in groups.items()
    ]
    places_per_group = [len(places) for places in groups.values()]
    if len(phrases) == 1 or (len(phrases) == 2 and places_per_group[0] == 1):
        return " and ".join(phrases)
    # the serial comma keeps "at the centre and the bottom right" apart from the next group
    return ", ".join(phrases[:-1]) + ", and " + phrases[-1]


def _count_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        colour, shape = rng.choice(scene.objects).kind
    else:
        colour, shape = rng.choice(sorted(COLOURS)), rng.choice(sorted(SHAPES))
    count = sum(obj.kind == (colour, shape) for obj in scene.objects)
    return f"How many {colour} {SHAPES[shape]} are there?", str(count)


def _shape_count_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    shape = rng.choice(sorted(SHAPES))
    return f"How many {SHAPES[shape]} are there?", str(sum(obj.shape == shape for obj in scene.objects))


def _total_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return "How many shapes are there?", str(len(scene.objects))


def _colour_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene.objects)
    return f"What colour is the {obj.shape} at the {obj.position}?", obj.colour


def _what_at_question(scene: Scene, rng: random.Random) -> tuple[str, str]:
    position = rng.choice(_reading_order())
    found = [obj for obj in scene.objects if obj.position == position]
    answer = _noun_phrase(found[0].colour, found[0].shape, 1) if found else "nothing"
    return f"What is at the {position}?", answer


def _where_question(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    kinds = Counter(obj.kind for obj in scene.objects)
    unique = [obj for obj in scene.objects if kinds[obj.kind] == 1]
    if not unique:
        return None
    obj = rng.choice(unique)
    return f"Where is the {obj.colour} {obj.shape}?", f"at the {obj.position}"


QUESTION_KINDS = (
    _count_question,
    _shape_count_question,
    _total_question,
    _colour_question,
    _what_at_question,
    _where_question,
)


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str]]:
    """(question, answer) pairs, one per question kind that applies, answers computed from the objects."""
    if not scene.objects:
        raise ValueError("a scene without objects has nothing to ask about")
    pairs = [kind(scene, rng) for kind in QUESTION_KINDS]
    return [pair for pair in pairs if pair is not None]


def scene_documents(scenes: list[Scene], rng: random.Random) -> list[list[dict]]:
    """Interleaved documents: per scene a captioned image and a short Q&A about it.

    Segments are `{"type": "image", "image": png_bytes}` and `{"type": "text", "text": str}`,
    the format of the data stage's interleaved-document reader.
    """
    documents = []
    for scene in scenes:
        text = rng.choice(CAPTION_TEMPLATES).format(caption=caption(scene))
        documents.append([{"type": "image", "image": scene.png}, {"type": "text", "text": text[0].upper() + text[1:]}])
        pairs = rng.sample(questions(scene, rng), rng.choice(QA_PER_DOCUMENT))
        qa_text = "\n".join(f"Q: {question} A: {answer}" for question, answer in pairs)
        documents.append(
            [
                {"type": "text", "text": "Picture:"},
                {"type": "image", "image": scene.png},
                {"type": "text", "text": qa_text},
            ]
        )
    return documents


def scene_questions(scenes: list[Scene], count: int, rng: random.Random) -> list[tuple[int, str, str]]:
    """`count` (scene index, question, answer) triples, drawn evenly over the scenes and question kinds."""
    if count and not scenes:
        raise ValueError("scene questions need at least one scene")
    out = []
    for i in range(count):
        index = i % len(scenes)
        question, answer = rng.choice(questions(scenes[index], rng))
        out.append((index, question, answer))
    return out
