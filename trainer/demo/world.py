"""The demo world: seeded images of a few coloured shapes, with captions (stages 1-2) and questions (stage 3).

Every image has 1-3 shapes, each in its own quadrant, with distinct (colour, shape) pairs, so that every question
has exactly one right answer. Question types: colour, shape, count, position, existence (yes/no), description.
"""

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw


COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230), "yellow": (235, 215, 40),
           "purple": (150, 60, 200)}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS = {"white": (245, 245, 245), "grey": (150, 150, 150), "black": (25, 25, 25)}
NUMBERS = ("zero", "one", "two", "three")
VQA_TYPES = ("colour", "shape", "count", "position", "exists")
CAPTION_PROMPT = "Describe the image briefly."  # the `pt` stage's one question
IMAGE_SIZE = 64  # pixels per side of the world's images


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    large: bool
    quadrant: int

    def words(self) -> str:
        return f"{'large' if self.large else 'small'} {self.colour} {self.shape}"


def sample_scene(rng: random.Random) -> tuple[str, list[Shape]]:
    count = rng.randint(1, 3)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], count)
    quadrants = rng.sample(range(4), count)
    shapes = [Shape(c, s, rng.random() < 0.5, q) for (c, s), q in zip(pairs, quadrants)]
    return rng.choice(list(BACKGROUNDS)), sorted(shapes, key=lambda shape: shape.quadrant)


def draw(background: str, shapes: list[Shape], size: int, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    pen = ImageDraw.Draw(image)
    half = size // 2
    for shape in shapes:
        radius = size * (0.21 if shape.large else 0.13)
        cx = (shape.quadrant % 2) * half + half / 2 + rng.uniform(-1, 1) * (half / 2 - radius - 1)
        cy = (shape.quadrant // 2) * half + half / 2 + rng.uniform(-1, 1) * (half / 2 - radius - 1)
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        colour = COLOURS[shape.colour]
        if shape.shape == "circle":
            pen.ellipse(box, fill=colour)
        elif shape.shape == "square":
            pen.rectangle(box, fill=colour)
        else:
            pen.polygon([(cx, cy - radius), (cx - radius, cy + radius), (cx + radius, cy + radius)], fill=colour)
    return image


# The Space's example picture (space/examples/shapes.png) and its questions: a scene the world draws and questions it
# asks, so that a demo model has been taught to answer them (`cumo-demo` checks that it does).
EXAMPLE_SCENE = ("white", (Shape("red", "circle", True, 0), Shape("blue", "square", True, 3)))
EXAMPLE_QUESTIONS = (("count", "", ""), ("shape", "red", ""), ("describe", "", ""))  # ask()'s arguments


def example_image() -> Image.Image:
    background, shapes = EXAMPLE_SCENE
    return draw(background, list(shapes), IMAGE_SIZE, random.Random(0))


def example_chats() -> list[tuple[str, str]]:
    """(question, answer) of each of the Space's examples."""
    return [ask(kind, list(EXAMPLE_SCENE[1]), colour, shape) for kind, colour, shape in EXAMPLE_QUESTIONS]


def region_crops(image: Image.Image, shapes: list[Shape]) -> list[tuple[Image.Image, str]]:
    """Each shape's quadrant, enlarged 2x as S2's second scale sees it, with the shape's words: image-text pairs
    in which colour alone does not tell captions apart, so contrastive training must learn shapes."""
    size = image.width
    half = size // 2
    crops = []
    for shape in shapes:
        x, y = (shape.quadrant % 2) * half, (shape.quadrant // 2) * half
        crop = image.crop((x, y, x + half, y + half)).resize((size, size), Image.Resampling.BICUBIC)
        crops.append((crop, f"A {shape.words()}."))
    return crops


def object_texts() -> list[str]:
    """The text of every object the world draws, as `region_crops` captions it."""
    return [f"A {Shape(colour, shape, large, 0).words()}." for large in (True, False) for colour in COLOURS
            for shape in SHAPES]


def patch_objects(text: str, objects: list[str], tokens: int) -> list[int]:
    """For each patch of a square grid, the index in `objects` of the object it shows, -1 where none: from a whole
    image's caption, the object in the patch's quadrant; from a region crop's caption, its one object everywhere."""
    if text in objects:
        return [objects.index(text)] * tokens
    by_quadrant = {shape.quadrant: objects.index(f"A {shape.words()}.") for shape in parse_caption(text)}
    return [by_quadrant.get(quadrant, -1) for quadrant in token_quadrants(tokens)]


def caption(shapes: list[Shape]) -> str:
    parts = [f"a {s.words()} in the {QUADRANTS[s.quadrant]}" for s in shapes]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return text[0].upper() + text[1:] + "."


def parse_caption(text: str) -> list[Shape]:
    """The shapes a caption names, the inverse of `caption`: lets tools read the scene of any saved image."""
    pattern = rf"(large|small) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) in the ({'|'.join(QUADRANTS)})"
    return [Shape(colour, shape, size == "large", QUADRANTS.index(where))
            for size, colour, shape, where in re.findall(pattern, text.lower())]


def ask(kind: str, shapes: list[Shape], colour: str = "", shape: str = "") -> tuple[str, str]:
    """The question of type `kind` about the object of `colour` and/or `shape`, and its answer on the image of `shapes`
    (`count` and `describe` name no object). The caller picks an object that makes the answer unique."""
    if kind == "colour":
        return f"What colour is the {shape}?", next(s.colour for s in shapes if s.shape == shape).capitalize() + "."
    if kind == "shape":
        return f"What shape is the {colour} object?", next(s.shape for s in shapes if s.colour == colour).capitalize() + "."
    if kind == "count":
        return "How many shapes are there?", NUMBERS[len(shapes)].capitalize() + "."
    if kind == "position":
        quadrant = next(s.quadrant for s in shapes if (s.colour, s.shape) == (colour, shape))
        return f"Where is the {colour} {shape}?", QUADRANTS[quadrant].capitalize() + "."
    if kind == "exists":
        return f"Is there a {colour} {shape}?", "Yes." if any((s.colour, s.shape) == (colour, shape) for s in shapes) else "No."
    if kind == "describe":
        return "Describe the image.", caption(shapes)
    raise ValueError(f"Unknown question type {kind!r}.")


def questions(shapes: list[Shape], rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, answer) for every question type that has one right answer on this image; each question asks
    about a shape of its own, so that in a conversation of them one question seldom gives another's answer away."""
    present = {(s.colour, s.shape) for s in shapes}
    asked = []
    target = rng.choice(shapes)
    if sum(s.shape == target.shape for s in shapes) == 1:
        asked.append(("colour", target.colour, target.shape))
    target = rng.choice(shapes)
    if sum(s.colour == target.colour for s in shapes) == 1:
        asked.append(("shape", target.colour, target.shape))
    asked.append(("count", "", ""))
    target = rng.choice(shapes)
    asked.append(("position", target.colour, target.shape))
    if rng.random() < 0.5:
        target = rng.choice(shapes)
        colour, shape = target.colour, target.shape
    else:
        colour, shape = rng.choice([(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present])
    asked += [("exists", colour, shape), ("describe", "", "")]
    return [(kind, *ask(kind, shapes, colour, shape)) for kind, colour, shape in asked]


def token_quadrants(tokens: int) -> list[int]:
    """The quadrant (an index into QUADRANTS) of each image token of a square grid, in the tokens' row-major order."""
    grid = int(tokens ** 0.5)
    return [(t // grid >= grid // 2) * 2 + (t % grid >= grid // 2) for t in range(tokens)]


def asked_object(kind: str, question: str, shapes: list[Shape]) -> Shape | None:
    """The object a colour, shape or position question names (the inverse of `questions` for those types); None for
    the types that name none, or an object not in `shapes`."""
    words = question.rstrip("?").lower().split()
    if kind == "colour":
        match = [s for s in shapes if s.shape == words[-1]]
    elif kind == "shape":
        match = [s for s in shapes if s.colour == words[-2]]
    elif kind == "position":
        match = [s for s in shapes if (s.colour, s.shape) == (words[-2], words[-1])]
    else:
        match = []
    return match[0] if len(match) == 1 else None


def conversation(turns: list[tuple[str, str]]) -> list[dict]:
    """LLaVA-format turns, the image placeholder at the start of the first question."""
    rows = []
    for k, (question, answer) in enumerate(turns):
        rows += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + question}, {"from": "gpt", "value": answer}]
    return rows


def write_split(folder: Path, name: str, samples: int, image_size: int, seed: int) -> dict:
    """Images plus `name`_captions.json, `name`_instructions.json (LLaVA format), `name`_regions.json (crop-caption
    pairs for the CLIP stand-in) and `name`_vqa.json (one question per line for evaluation)."""
    rng = random.Random(seed)
    (folder / name).mkdir(parents=True, exist_ok=True)
    (folder / name / "regions").mkdir(exist_ok=True)
    captions, regions, instructions, vqa = [], [], [], []
    for i in range(samples):
        background, shapes = sample_scene(rng)
        path = f"{name}/{i:05d}.png"
        image = draw(background, shapes, image_size, rng)
        image.save(folder / path)
        for j, (crop, words) in enumerate(region_crops(image, shapes)):
            crop.save(folder / f"{name}/regions/{i:05d}_{j}.png")
            regions.append({"image": f"{name}/regions/{i:05d}_{j}.png", "caption": words})
        captions.append({"id": f"{name}-cap-{i}", "image": path, "conversations": [
            {"from": "human", "value": "<image>\n" + CAPTION_PROMPT},
            {"from": "gpt", "value": caption(shapes)}]})
        qa = questions(shapes, rng)
        asked = [(question, answer) for kind, question, answer in qa if kind in VQA_TYPES]
        rng.shuffle(asked)
        # The short questions in one conversation, in random order: an image's tokens are most of a sample's cost, and
        # each answer is a lesson in finding the named shape (docs/demo_experiments.md compares one question per
        # sample). The description is a conversation of its own, as it would give every answer away.
        instructions.append({"id": f"{name}-vqa-{i}", "image": path, "conversations": conversation(asked)})
        for kind, question, answer in qa:
            if kind == "describe":
                instructions.append({"id": f"{name}-describe-{i}", "image": path,
                                     "conversations": conversation([(question, answer)])})
            else:
                vqa.append({"id": f"{name}-vqa-{i}-{kind}", "image": path, "type": kind, "question": question,
                            "answer": answer, "objects": len(shapes)})
    for suffix, rows in (("captions", captions), ("regions", regions), ("instructions", instructions), ("vqa", vqa)):
        (folder / f"{name}_{suffix}.json").write_text(json.dumps(rows))
    return {"images": samples, "vqa_questions": len(vqa)}


def scene_words(shapes: list[Shape], tokens: int) -> list[list[str]]:
    """What each image token of a square grid shows, in the world's words: the size, colour, shape and quadrant of the
    object in the token's quadrant; nothing for an empty quadrant (the world's texts never name the background)."""
    by_quadrant = {shape.quadrant: shape for shape in shapes}
    return [by_quadrant[q].words().split() + QUADRANTS[q].split() if q in by_quadrant else []
            for q in token_quadrants(tokens)]


def scene_chats(count: int, seed: int) -> list[tuple[list[Shape], list[dict], bool]]:
    """Scenes for the language model's pre-training, each with a chat about it: (shapes, messages, plain). One in three
    is the `pt` stage's caption in its plain template (`plain` True), the others the scene's questions in random
    order, as in the `vit` chats. The image is the first user message's `{"type": "image"}` part; the LLM stand-in
    reads it as `scene_words` tokens, the form the projector later learns to give real images (docs/demo_experiments.md)."""
    rng = random.Random(f"{seed}-scenes")
    chats = []
    for _ in range(count):
        _, shapes = sample_scene(rng)
        if rng.random() < 1 / 3:
            turns, plain = [(CAPTION_PROMPT, caption(shapes))], True
        else:
            turns = [(question, answer) for kind, question, answer in questions(shapes, rng) if kind in VQA_TYPES]
            rng.shuffle(turns)
            plain = False
        chats.append((shapes, chat_messages(turns), plain))
    return chats


def colour_lookup_chats(count: int, seed: int) -> list[tuple[list[Shape], list[dict], bool]]:
    """Scene chats (as `scene_chats`) on 2-3 shapes that ask the colour of every object whose shape is unique: the
    one question that finds an object by its shape alone (the texts name colours first, "the red triangle"), taught
    first so that this lookup forms before the lookup by colour does (docs/demo_experiments.md)."""
    rng = random.Random(f"{seed}-colour-lookup")
    chats = []
    while len(chats) < count:
        _, shapes = sample_scene(rng)
        turns = [ask("colour", shapes, s.colour, s.shape) for s in shapes if [t.shape for t in shapes].count(s.shape) == 1]
        if len(shapes) >= 2 and turns:
            rng.shuffle(turns)
            chats.append((shapes, chat_messages(turns), False))
    return chats


def chat_messages(turns: list[tuple[str, str]]) -> list[dict]:
    """(question, answer) turns as chat messages, the image as the first user message's `{"type": "image"}` part."""
    messages = []
    for i, (question, answer) in enumerate(turns):
        content = ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": question}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return messages


def corpus(folder: Path, name: str) -> list[str]:
    """All sentences of a split, for training the tokenizer."""
    texts = []
    for suffix in ("captions", "instructions"):
        for row in json.loads((folder / f"{name}_{suffix}.json").read_text()):
            texts += [turn["value"].replace("<image>\n", "") for turn in row["conversations"]]
    return texts


if __name__ == "__main__":  # python -m trainer.demo.world space/examples/shapes.png: redraw the Space's example
    import sys

    example_image().save(sys.argv[1])
