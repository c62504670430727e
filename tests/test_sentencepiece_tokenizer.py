"""The converter's tokenizer gives the ids of the original's slow SentencePiece tokenizer (`legacy=True`), on a
SentencePiece model trained here with Mistral's normaliser settings, and keeps doing so after save and load."""

import json
import random

import pytest
from transformers import AutoProcessor, AutoTokenizer

from conftest import IMAGE_SIZE, PATCH_SIZE, slow_sentencepiece_ids
from hub_upload.sentencepiece_tokenizer import original_tokenizer
from modeling_cumo import CuMoProcessor
from modeling_cumo.processing_cumo import make_image_processor


sentencepiece = pytest.importorskip("sentencepiece")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.", "A red circle in the top left, a blue square at the bottom.",
    "What is shown here? Describe the colors of the picture.", "Numbers like 3.14, 2024 and 1,000,000 appear.",
    "Über café naïve résumé — déjà vu.", "中文文本也在这里。日本語のテキスト。", "emoji 😀 and symbols ∑ ∞ ≤ ≥",
    "    indented code:\n\tdef f(x):\n\t\treturn x * 2\n", "[INST] instructions [/INST] answers </s>",
    "<<SYS>>\nsystem text\n<</SYS>>", "multiple   spaces   between   words", "trailing spaces   ",
]
SPECIALS = {"<unk>": 0, "<s>": 1, "</s>": 2}


@pytest.fixture(scope="module")
def mistral_like_folder(tmp_path_factory):
    """tokenizer.model + tokenizer_config.json as a released checkpoint ships them: BPE, byte fallback, identity
    normaliser, dummy prefix, extra whitespace kept, digits split (Mistral's settings)."""
    folder = tmp_path_factory.mktemp("spm")
    lines = [line for text in CORPUS for line in (text, text.lower(), text.upper())] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(folder / "tokenizer"), model_type="bpe", vocab_size=600,
        byte_fallback=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=0.9995, minloglevel=2,
    )
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "legacy": True, "add_bos_token": True, "add_eos_token": False,
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
    }))
    return folder


def varied_strings(count=400, seed=0):
    rng = random.Random(seed)
    words = "the a red blue circle picture describe colors what is shown here 3 14 2024 café Über 中文 😀".split()
    glue = [" ", "  ", "\n", "\t", "", " <image> ", "<image>", "<image>\n", "\n<image>", " <s>", "</s>", "<s>[INST] ",
            " [/INST]", "<<SYS>>\n", "\n<</SYS>>\n\n", ". ", "? ", "  \n  ", "€", "ß", "é"]
    strings = []
    for _ in range(count):
        parts = [rng.choice(words if rng.random() < 0.6 else glue) for _ in range(rng.randint(0, 12))]
        strings.append("".join(parts))
    return strings


def test_ids_equal_the_slow_sentencepiece_tokenizer(mistral_like_folder):
    model = sentencepiece.SentencePieceProcessor(model_file=str(mistral_like_folder / "tokenizer.model"))
    tokenizer = original_tokenizer(mistral_like_folder)
    image_id = tokenizer.image_token_id
    mismatches = []
    for text in varied_strings():
        # the original tokenizes the chunks around each <image> apart (tokenizer_image_token)
        expected = []
        for index, chunk in enumerate(text.split("<image>")):
            expected += ([image_id] if index else []) + slow_sentencepiece_ids(chunk, model, SPECIALS)
        if tokenizer(text)["input_ids"] != expected:
            mismatches.append(text)
    assert not mismatches, f"{len(mismatches)} strings differ, e.g. {mismatches[:3]!r}"


def test_the_tokenizer_adds_no_special_tokens_and_survives_save_and_load(mistral_like_folder, tmp_path):
    tokenizer = original_tokenizer(mistral_like_folder)
    text = "<s><s>[INST] Look at this <image> picture. [/INST]"
    ids = tokenizer(text)["input_ids"]
    assert ids[:3] == [1, 1, tokenizer.convert_tokens_to_ids("▁[")]
    assert tokenizer("plain")["input_ids"][0] != tokenizer.bos_token_id

    processor = CuMoProcessor(make_image_processor(IMAGE_SIZE), tokenizer, patch_size=PATCH_SIZE)
    processor.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text)["input_ids"] == ids
    reloaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    assert reloaded.tokenizer(text)["input_ids"] == ids
    assert reloaded.tokenizer.decode(reloaded.tokenizer("A red circle.")["input_ids"]) == "A red circle."


def test_a_tokenizer_that_adds_bos_is_set_to_add_none_by_the_processor(mistral_like_folder):
    tokenizer = original_tokenizer(mistral_like_folder)
    tokenizer.add_bos_token = True
    assert tokenizer("x")["input_ids"][0] == tokenizer.bos_token_id
    processor = CuMoProcessor(make_image_processor(IMAGE_SIZE), tokenizer, patch_size=PATCH_SIZE)
    prompt = processor.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert processor(text=prompt)["input_ids"][0][:3] == [1, 1, tokenizer.convert_tokens_to_ids("▁[")]


def test_non_legacy_tokenizer_config_is_refused(mistral_like_folder, tmp_path):
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((mistral_like_folder / name).read_bytes())
    settings = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**settings, "legacy": False}))
    with pytest.raises(ValueError, match="legacy"):
        original_tokenizer(tmp_path)
