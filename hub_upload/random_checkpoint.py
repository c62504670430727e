"""Write a tiny CuMo folder with random weights and its own small tokenizer: the whole API (Auto classes, processor,
chat template, generate) works on it offline in seconds. Its answers are noise; train one to get sense."""

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration, CuMoProcessor
from modeling_cumo.processing_cumo import make_image_processor


# eos is not id 2: CLIP's text tower reads id 2 as "pool at the highest id" (a legacy rule)
SPECIAL_TOKENS = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "What is in this picture? What colour is the square? How many shapes are there?",
    "There is a red circle, a blue square and a green triangle on a white background.",
]


def make_tokenizer(vocab_size: int = 320, corpus: list[str] = CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `corpus` (by default a few sentences), `<image>` a special token."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"}, padding_side="left",
    )


def build(output: Path, num_experts: int = 4, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    tokenizer = make_tokenizer()
    image_size, patch_size = 56, 14
    config = CuMoConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        text_config=dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer),
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_num_experts=num_experts,
        projector_num_experts=num_experts,
    )
    model = CuMoForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = CuMoProcessor(make_image_processor(image_size), tokenizer, patch_size=patch_size)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, required=True, help="folder to write (created if missing)")
    parser.add_argument("--num-experts", type=int, default=4, help="experts in every CLIP MLP and the projector "
                        "(0 for dense blocks); top-2 routing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    print(f"Wrote a random-weight CuMo to {build(args.output, args.num_experts, args.seed)}")


if __name__ == "__main__":
    main()
