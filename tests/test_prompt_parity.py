"""Same chat, same ids as the original: every path from a conversation to token ids gives what the original
project feeds its model (tests/data/refs.safetensors, and the original's tokenization rules as an oracle)."""

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from conftest import DATA, slow_sentencepiece_ids
from hub_upload.convert_original import convert
from modeling_cumo.processing_cumo import PLAIN_CHAT_TEMPLATE
from trainer.data import CuMoDataCollator, llava_record_to_messages


ORIGINAL_IMAGE = -200  # the original's IMAGE_TOKEN_INDEX
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, "
    "and polite answers to the user's questions."
)
# The reference prompts (refs.json "prompts", template `mistral_instruct`: an empty system text) as user messages
REFERENCE_CHATS = {
    "img_middle": ("Look at this <image> picture and describe the colors.", 1),
    "text_only": ("What is the capital of the moon?", 0),
    "img_first": ("What is shown here?", 1),
    "two_images": ("Compare <image> with <image> please.", 2),
}
REFERENCE_ROWS = {"img_middle": ("batch", 0), "text_only": ("batch", 1), "img_first": ("multi", 0),
                  "two_images": ("multi", 1)}


@pytest.fixture(scope="module")
def refs():
    return load_file(DATA / "refs.safetensors")


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    return convert(DATA / "original_ckpt", tmp_path_factory.mktemp("parity") / "cumo")


@pytest.fixture(scope="module")
def processor(converted):
    return AutoProcessor.from_pretrained(converted, trust_remote_code=True)


def images(count):
    files = sorted((DATA / "images").glob("img*.png"))
    return [Image.open(files[i % len(files)]).convert("RGB") for i in range(count)]


def chat(text, num_images, system="", with_pixels=False):
    pictures = images(num_images)
    content = [{"type": "image", "image": image} if with_pixels else {"type": "image"} for image in pictures]
    return [{"role": "system", "content": system},
            {"role": "user", "content": content + [{"type": "text", "text": text}]}], pictures


def collapse(ids, image_token_id, attention_mask=None):
    """Our ids with each run of expanded image tokens written as the original's single placeholder, padding dropped."""
    ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    mask = attention_mask.tolist() if attention_mask is not None else [1] * len(ids)
    out = []
    for token, real in zip(ids, mask):
        if not real:
            continue
        if token == image_token_id:
            if out and out[-1] == ORIGINAL_IMAGE:
                continue
            token = ORIGINAL_IMAGE
        out.append(token)
    return out


def reference_row(refs, name):
    case, row = REFERENCE_ROWS[name]
    return collapse(refs[f"{case}.input_ids"][row], None, refs[f"{case}.attention_mask"][row])


@pytest.mark.parametrize("name", sorted(REFERENCE_CHATS))
def test_rendered_text_through_the_processor_gives_the_originals_ids(processor, refs, name):
    text, num_images = REFERENCE_CHATS[name]
    messages, pictures = chat(text, num_images)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=pictures or None, text=prompt, return_tensors="pt")
    assert collapse(inputs["input_ids"][0], processor.image_token_id) == reference_row(refs, name)


@pytest.mark.parametrize("name", sorted(REFERENCE_CHATS))
def test_tokenized_chat_template_gives_the_originals_ids(processor, refs, name):
    text, num_images = REFERENCE_CHATS[name]
    messages, _ = chat(text, num_images, with_pixels=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert collapse(inputs["input_ids"][0], processor.image_token_id) == reference_row(refs, name)
    assert inputs["pixel_values"].shape[0] == num_images if num_images else "pixel_values" not in inputs


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_padded_batches_keep_each_prompts_ids(processor, refs, padding_side):
    names = ["img_middle", "text_only", "two_images"]
    prompts, pictures = [], []
    for name in names:
        messages, picture = chat(*REFERENCE_CHATS[name])
        prompts.append(processor.apply_chat_template(messages, add_generation_prompt=True))
        pictures += picture
    inputs = processor(images=pictures, text=prompts, padding=True, padding_side=padding_side, return_tensors="pt")
    for row, name in enumerate(names):
        ids = collapse(inputs["input_ids"][row], processor.image_token_id, inputs["attention_mask"][row])
        assert ids == reference_row(refs, name)
    first_real = inputs["attention_mask"].argmax(dim=1)
    assert (first_real > 0).any() == (padding_side == "left")


# ---- the original's tokenization rules as an oracle, for chats the reference file does not hold ----

def original_prompt(turns, system):
    """`Conversation.get_prompt` of `mistral_instruct(_system)` (REFERENCE_FORMAT.md, section 9)."""
    prompt = "<s>"
    for index, (role, text) in enumerate(turns):
        if role == "user":
            if index == 0 and system:
                text = f"<<SYS>>\n{system}\n<</SYS>>\n\n" + text
            prompt += f"[INST] {text} [/INST]"
        else:
            prompt += f" {text} </s>"
    return prompt


def tokenizer_image_token(prompt, sentencepiece, specials, bos_id):
    """The original's `tokenizer_image_token`: the chunks around each `<image>` tokenized apart, one BOS in front."""
    ids = [bos_id]
    for index, chunk in enumerate(prompt.split("<image>")):
        if index:
            ids.append(ORIGINAL_IMAGE)
        ids += slow_sentencepiece_ids(chunk, sentencepiece, specials)
    return ids


@pytest.fixture(scope="module")
def oracle():
    import sentencepiece

    model = sentencepiece.SentencePieceProcessor(model_file=str(DATA / "original_ckpt" / "tokenizer.model"))
    specials = {"<unk>": 0, "<s>": 1, "</s>": 2}
    return lambda prompt: tokenizer_image_token(prompt, model, specials, bos_id=1)


CHATS = [
    # (turns as (role, text, images), system)
    ([("user", "What color is the car?", 1)], SYSTEM),
    ([("user", "What is in this picture?", 1), ("assistant", "A red car.", 0), ("user", "What color is the sky?", 0)],
     SYSTEM),
    ([("user", "Hi there!", 0), ("assistant", "Hello.", 0), ("user", "Über café, 中文?\nTwo lines.", 0)], ""),
    ([("user", "First <image> then <image>, compare.", 2)], SYSTEM),
    ([("user", "  leading and trailing spaces  ", 2), ("assistant", " spaced ", 0), ("user", "more?", 0)], "Be brief."),
]


@pytest.mark.parametrize("index", range(len(CHATS)))
def test_multi_turn_and_multi_image_chats_match_the_originals_rules(processor, oracle, index):
    turns, system = CHATS[index]
    messages = [{"role": "system", "content": system}] if system != SYSTEM else []
    original_turns, pictures = [], []
    for role, text, num_images in turns:
        picture = images(num_images)
        pictures += picture
        messages.append({"role": role, "content": [{"type": "image", "image": image} for image in picture]
                         + [{"type": "text", "text": text}]})
        placed = text.count("<image>")
        original_turns.append((role, "<image>\n" * (num_images - placed) + text))
    expected = oracle(original_prompt(original_turns, system))

    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    by_text = processor(images=pictures or None, text=rendered, return_tensors="pt")["input_ids"][0]
    by_template = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                                return_tensors="pt")["input_ids"][0]
    assert collapse(by_text, processor.image_token_id) == expected
    assert collapse(by_template, processor.image_token_id) == expected


def test_plain_pretraining_format_matches_the_originals(processor, oracle):
    """Stage `pt`: the original tokenizes `<image>` + caption + newline (one BOS, no template text)."""
    caption = "A small red circle in the top left."
    messages = [{"role": "user", "content": [{"type": "image", "image": images(1)[0]}]},
                {"role": "assistant", "content": [{"type": "text", "text": caption}]}]
    expected = oracle("<image>" + caption + "\n")
    output = processor.apply_chat_template(messages, chat_template=PLAIN_CHAT_TEMPLATE, tokenize=True,
                                           return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt")
    ids = output["input_ids"][0]
    assert collapse(ids, processor.image_token_id) == expected
    # the original supervises everything after the image: the caption and its newline
    supervised = ids[output["assistant_masks"][0].bool()].tolist()
    assert supervised == expected[expected.index(ORIGINAL_IMAGE) + 1:]


def test_training_batch_matches_the_originals_ids_and_labels(processor, refs):
    records = [
        {"id": "img", "image": "img0_45x30.png", "conversations": [
            {"from": "system", "value": ""},
            {"from": "human", "value": "Look at this <image> picture and describe the colors."},
            {"from": "gpt", "value": "The colors are red and blue."}]},
        {"id": "text", "conversations": [
            {"from": "system", "value": ""},
            {"from": "human", "value": "What is the capital of the moon?"},
            {"from": "gpt", "value": "There is no capital."}]},
    ]
    examples = [llava_record_to_messages(record, DATA / "images") for record in records]
    collator = CuMoDataCollator(processor=processor, assistant_only_loss=True, image_token_id=processor.image_token_id)
    batch = collator([{"messages": e["messages"], "images": e["images"]} for e in examples])
    image_id = processor.image_token_id

    def row(tensor_name, index):
        mask = refs["train.attention_mask"][index]
        return refs[tensor_name][index][mask.bool()].tolist()

    # the text-only chat matches whole: ids and labels
    mask = batch["attention_mask"][1].bool()
    assert batch["input_ids"][1][mask].tolist() == row("train.input_ids", 1)
    assert batch["labels"][1][mask].tolist() == row("train.labels", 1)

    # the image chat: its `<image>` moves to the front of the turn (as the original's data pipeline does), so compare
    # what does not depend on the image's place
    ours = collapse(batch["input_ids"][0], image_id, batch["attention_mask"][0])
    theirs = row("train.input_ids", 0)
    prompt_start = theirs[: theirs.index(ORIGINAL_IMAGE)][:6]  # BOS, BOS, "▁[INST]", "▁"
    assert ours[:6] == prompt_start
    assert ours[ours.index(ORIGINAL_IMAGE) + 1] == theirs[theirs.index(ORIGINAL_IMAGE) + 1]  # the "▁" after the image
    assert [t for t in batch["labels"][0].tolist() if t != -100] == [t for t in row("train.labels", 0) if t != -100]
    assert not (batch["labels"][0][batch["input_ids"][0] == image_id] != -100).any()


def test_reference_image_file_and_chat_generate_the_originals_tokens(converted, processor, refs):
    model = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True).eval()
    messages, _ = chat(REFERENCE_CHATS["img_middle"][0], 0)
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=[Image.open(DATA / "images" / "img0_45x30.png")], text=prompt, return_tensors="pt")
    expected = refs["generate.output_ids"][0, 1:]  # the original returns [BOS] + new tokens
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=len(expected), do_sample=False)
    assert output[0, inputs["input_ids"].shape[1]:].tolist() == expected.tolist()
