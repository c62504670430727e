"""Stand-ins for the pretrained parts that cannot be downloaded here, trained on the demo world and saved as
ordinary transformers checkpoints: a small CLIP (contrastive image-text training) and a small Mistral (language
modelling on the texts it is given: the demo gives it question chats with the scene's caption in the image's place,
`world.reading_practice`; a 2026-12-03 proxy had found such reading slower, but whole demo runs gain from it:
docs/demo_experiments.md)."""

from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPConfig, CLIPModel, MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from hub_upload.random_checkpoint import make_tokenizer
from modeling_cumo.processing_cumo import CHAT_TEMPLATE, make_image_processor


def train_tokenizer(texts: list[str], folder: Path) -> PreTrainedTokenizerFast:
    templates = [CHAT_TEMPLATE, "<<SYS>> <</SYS>> [INST] [/INST]"]
    tokenizer = make_tokenizer(vocab_size=600, corpus=texts + templates)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def _fit(model, loss_of, count: int, steps: int, batch_size: int, lr: float, seed: int, desc: str) -> None:
    """AdamW with a one-cycle schedule over `steps` random batches; `loss_of(indices)` gives a batch's loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    progress = tqdm(range(steps), desc=desc)
    for _ in progress:
        loss = loss_of(torch.randint(0, count, (batch_size,), generator=generator))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")


def train_clip(images: list[Path], captions: list[str], tokenizer, folder: Path, image_size: int, patch_size: int,
               steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0) -> CLIPModel:
    torch.manual_seed(seed)
    config = CLIPConfig(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                           image_size=image_size, patch_size=patch_size),
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=len(tokenizer), max_position_embeddings=64, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id),
        projection_dim=64,
    )
    model = CLIPModel(config)
    pixels = make_image_processor(image_size)([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    text = tokenizer([c + tokenizer.eos_token for c in captions], padding=True, padding_side="right", return_tensors="pt")

    def loss_of(index):
        return model(input_ids=text["input_ids"][index], attention_mask=text["attention_mask"][index],
                     pixel_values=pixels[index], return_loss=True).loss

    _fit(model, loss_of, len(images), steps, batch_size, lr, seed, "CLIP stand-in")
    model.save_pretrained(folder)
    make_image_processor(image_size).save_pretrained(folder)
    return model


LLM_BATCH_SIZE = 32


def train_llm(texts: list[str], tokenizer, folder: Path, steps: int, batch_size: int = LLM_BATCH_SIZE, lr: float = 2e-3,
              seed: int = 0) -> MistralForCausalLM:
    torch.manual_seed(seed)
    # 8 heads of 16 and initializer_range 0.1: in text checks, tiny transformers trained from scratch learned
    # "find the object the question names" in a few hundred steps this way, and not in thousands with the defaults
    config = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, initializer_range=0.1, vocab_size=len(tokenizer), max_position_embeddings=512,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    model = MistralForCausalLM(config)
    batches = TextBatches(tokenizer, texts)

    def loss_of(index):
        return model(**batches[index]).loss

    _fit(model, loss_of, len(texts), steps, batch_size, lr, seed, "LLM stand-in")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


class TextBatches:
    """The corpus tokenized once; `batches[index]` is those texts as a causal-LM batch, cut to the longest of them.
    Padding goes on the right (the tokenizer pads left, for generation), so a batch's first columns hold all of its
    tokens and every text starts at position 0, as a chat does."""

    def __init__(self, tokenizer, texts: list[str], max_length: int = 256):
        self.encoded = tokenizer(texts, padding=True, padding_side="right", truncation=True, max_length=max_length,
                                 return_tensors="pt", add_special_tokens=False)
        self.labels = self.encoded["input_ids"].masked_fill(self.encoded["attention_mask"] == 0, -100)

    def __getitem__(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        width = int(self.encoded["attention_mask"][index].sum(1).max())
        return {"input_ids": self.encoded["input_ids"][index, :width],
                "attention_mask": self.encoded["attention_mask"][index, :width], "labels": self.labels[index, :width]}
