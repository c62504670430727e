"""The original CuMo's tokenizer, as a `tokenizers` tokenizer that transformers 5 loads unchanged.

The original loads the checkpoint's `tokenizer.model` with the slow SentencePiece `LlamaTokenizer` (`use_fast=False`,
`legacy=True`): the text is split at special tokens and every piece is encoded by SentencePiece on its own, so every
piece gets the dummy-prefix `▁` (`<s>[INST]` reads `▁[`, and the text after each `<image>` starts with a `▁`).
transformers 5's `LlamaTokenizer` rebuilds its pipeline with a `Metaspace` pre-tokenizer, which prefixes a piece
only when it does not already start with a space, and drops `legacy` on save. The tokenizer built here keeps
transformers' SentencePiece-to-BPE conversion of the vocabulary and merges, and normalises each piece the way
SentencePiece does (prepend `▁`, spaces to `▁`), saved with the plain `TokenizersBackend` class so that no
loader rebuilds it.
"""

import json
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast


SPIECE_UNDERLINE = "▁"


def _sentencepiece_normalizer(model_file: Path):
    """The normaliser SentencePiece applies to each piece, from the model's own `normalizer_spec`."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_file.read_bytes())
    spec = proto.normalizer_spec
    steps = []
    if spec.precompiled_charsmap:  # e.g. nmt_nfkc; Mistral's and Llama's models use "identity" (none)
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(r"^ +| +$"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(SPIECE_UNDERLINE))
    steps.append(normalizers.Replace(" ", SPIECE_UNDERLINE))
    return normalizers.Sequence(steps), spec.add_dummy_prefix


def original_tokenizer(folder: str | Path, image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """The tokenizer of an original CuMo checkpoint folder (its `tokenizer.model` and `tokenizer_config.json`), giving
    the ids of the original's slow tokenizer for every text, plus `image_token` as a special token.

    Like every CuMo tokenizer it adds no BOS of its own: CuMo's chat template writes every special token (the
    original's literal `<s>` and the BOS its tokenizer adds), so that each path that tokenizes a chat agrees."""
    folder = Path(folder)
    model_file = folder / "tokenizer.model"
    if not model_file.is_file():
        raise FileNotFoundError(f"{folder} has no tokenizer.model (the original loads its slow SentencePiece tokenizer).")
    settings = json.loads((folder / "tokenizer_config.json").read_text()) \
        if (folder / "tokenizer_config.json").is_file() else {}
    if settings.get("legacy") is False:
        raise ValueError(f"{folder}/tokenizer_config.json sets legacy=false; only the legacy SentencePiece behaviour "
                         "(the original's default, and what the released checkpoints use) is reproduced.")
    # transformers' own SentencePiece -> BPE conversion of the vocabulary and merges (only tokenizer.model is read)
    converted = LlamaTokenizer.from_pretrained(folder, vocab_file=str(model_file), tokenizer_file=None)
    backend = Tokenizer.from_str(converted.backend_tokenizer.to_str())
    backend.normalizer, add_dummy_prefix = _sentencepiece_normalizer(model_file)
    backend.pre_tokenizer = None
    steps = [decoders.Replace(SPIECE_UNDERLINE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=converted.bos_token,
        eos_token=converted.eos_token,
        unk_token=converted.unk_token,
        pad_token=converted.pad_token or converted.unk_token,  # the original pads with unk
        model_max_length=settings.get("model_max_length", converted.model_max_length),
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": image_token},
    )
    tokenizer.add_bos_token = False
    tokenizer.add_eos_token = False
    return tokenizer


def cumo_tokenizer(folder: str | Path, image_token: str = "<image>") -> PreTrainedTokenizerFast:
    """The tokenizer a new CuMo gets from its language model's folder: the original's SentencePiece behaviour where
    the folder has a legacy `tokenizer.model` (Mistral, Llama), else the folder's own tokenizer; `<image>` added."""
    folder = Path(folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text()) \
        if (folder / "tokenizer_config.json").is_file() else {}
    if (folder / "tokenizer.model").is_file() and settings.get("legacy") is not False:
        return original_tokenizer(folder, image_token)
    tokenizer = AutoTokenizer.from_pretrained(folder, extra_special_tokens={"image_token": image_token})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer
