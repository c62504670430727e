"""Stand-ins for the pretrained parts that cannot be downloaded here, trained on the demo world and saved as
ordinary transformers checkpoints: a small CLIP (contrastive image-text training) and a small Mistral (language
modelling on chats about scenes whose image is given in the world's own words, `SceneBatches`: what the lookup "find
the object the question names" needs, learned before any image is seen; docs/demo_experiments.md)."""

import random
from contextlib import contextmanager
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import (AttentionInterface, CLIPConfig, CLIPModel, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from hub_upload.random_checkpoint import make_tokenizer
from modeling_cumo.processing_cumo import CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE, make_image_processor
from trainer.demo import world


def train_tokenizer(texts: list[str], folder: Path) -> PreTrainedTokenizerFast:
    templates = [CHAT_TEMPLATE, "<<SYS>> <</SYS>> [INST] [/INST]"]
    tokenizer = make_tokenizer(vocab_size=600, corpus=texts + templates)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


def has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (AMX or AVX512-BF16); elsewhere bf16 is emulated and slower than
    float32."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("amx_bf16") or capabilities.get("avx512_bf16"))


def sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention outside autocast: the CPU's bf16 flash-attention backward is about twice as slow
    as its float32 one at the stand-ins' sizes (head size 16-32, 64-200 tokens)."""
    with torch.autocast("cpu", enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask, **kwargs)
    return out.to(query.dtype), weights


AttentionInterface.register("sdpa_float32", sdpa_in_float32)
# with its masks too: transformers builds no mask at all (no padding, no causality) for a name it has no mask for
AttentionMaskInterface.register("sdpa_float32", sdpa_mask)


@contextmanager
def float32_attention(model):
    """Train `model` with `sdpa_in_float32`; it is back on transformers' "sdpa" after, which its checkpoint then
    names."""
    model.set_attn_implementation("sdpa_float32")
    try:
        yield model
    finally:
        model.set_attn_implementation("sdpa")


def _fit(model, loss_of, count: int, steps: int, batch_size: int, lr: float, seed: int, desc: str,
         callback=None, first: tuple[int, int] = (0, 0), dtype: torch.dtype = torch.float32) -> None:
    """AdamW with a one-cycle schedule over `steps` random batches of indices below `count`; `loss_of(indices)` gives
    a batch's loss; `callback(step, model)`, if given, runs after each step. With `first` = (steps1, rows1), the first
    steps1 batches come from the first rows1 rows and the others from the rest (a curriculum). With `dtype` bf16 the
    forward passes run under bf16 autocast (weights and optimiser stay float32)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    progress = tqdm(range(steps), desc=desc)
    for step in progress:
        low, high = (0, first[1]) if step < first[0] else (first[1], count)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = loss_of(torch.randint(low, high, (batch_size,), generator=generator))
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        progress.set_postfix(loss=f"{loss.item():.3f}")
        if callback is not None:
            callback(step + 1, model)


def train_clip(images: list[Path], captions: list[str], tokenizer, folder: Path, image_size: int, patch_size: int,
               steps: int, batch_size: int = 64, lr: float = 1e-3, seed: int = 0,
               patch_objects: list[list[int]] | None = None, objects: list[str] = (),
               dtype: torch.dtype = torch.float32) -> CLIPModel:
    """Contrastive image-caption training; with `patch_objects` (per image, per patch, an index into `objects`, the
    texts of the world's objects, or -1 for none), also a dense loss that makes each patch token of the feature layer
    (-2, the one CuMo reads) match the text of the object it shows."""
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
    # Position embeddings at std 1, not CLIP's 0.02: the patch tokens then say which quadrant they are in (a probe
    # reads it at 0.83 against 0.30), which position answers need once the LLM can find the asked object
    torch.nn.init.normal_(model.vision_model.embeddings.position_embedding.weight, std=1.0)
    pixels = make_image_processor(image_size)([Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    text = tokenizer([c + tokenizer.eos_token for c in captions], padding=True, padding_side="right", return_tensors="pt")
    if patch_objects is not None:
        targets = torch.tensor(patch_objects)
        object_text = tokenizer([o + tokenizer.eos_token for o in objects], padding=True, padding_side="right",
                                return_tensors="pt")

    def loss_of(index):
        output = model(input_ids=text["input_ids"][index], attention_mask=text["attention_mask"][index],
                       pixel_values=pixels[index], return_loss=True, output_hidden_states=patch_objects is not None)
        if patch_objects is None:
            return output.loss
        return output.loss + patch_loss(model, output.vision_model_output.hidden_states[-2][:, 1:], targets[index],
                                        object_text)

    with float32_attention(model):
        _fit(model, loss_of, len(images), steps, batch_size, lr, seed, "CLIP stand-in", dtype=dtype)
    model.save_pretrained(folder)
    make_image_processor(image_size).save_pretrained(folder)
    return model


def patch_loss(model: CLIPModel, patches: torch.Tensor, targets: torch.Tensor, object_text: dict) -> torch.Tensor:
    """Cross-entropy of each patch token (projected as CLIP projects its image embedding) over the objects' texts:
    a real CLIP's patch tokens say what lies under them, which LLaVA-style models rely on; a small stand-in trained
    on whole images learns it in its pooled token and much less in its patch tokens (docs/demo_experiments.md has the
    probes)."""
    texts = model.get_text_features(**object_text).pooler_output
    tokens = model.visual_projection(model.vision_model.post_layernorm(patches))
    logits = torch.nn.functional.normalize(tokens, dim=-1) @ torch.nn.functional.normalize(texts, dim=-1).T
    return torch.nn.functional.cross_entropy((logits * model.logit_scale.exp()).flatten(0, 1), targets.flatten(),
                                             ignore_index=-1)


LLM_BATCH_SIZE = 32


def train_llm(scenes: "SceneBatches", tokenizer, folder: Path, steps: int, batch_size: int = LLM_BATCH_SIZE,
              lr: float = 5e-3, seed: int = 0, callback=None, first: tuple[int, int] = (0, 0),
              dtype: torch.dtype = torch.float32) -> MistralForCausalLM:
    torch.manual_seed(seed)
    # 8 heads and initializer_range 0.1: tiny transformers learn lookups faster than with the defaults; heads of 32,
    # the smallest vLLM's CPU attention serves; rope_theta 1e6 as Mistral-7B-v0.2
    config = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, head_dim=32, initializer_range=0.1, rope_theta=1e6,
                           vocab_size=len(tokenizer),
                           max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           tie_word_embeddings=False)
    model = MistralForCausalLM(config)
    start_attention_as_similarity(model)

    def loss_of(index):
        return model(**scenes.batch(index, model.get_input_embeddings())).loss

    with float32_attention(model):
        _fit(model, loss_of, len(scenes), steps, batch_size, lr, seed, "LLM stand-in", callback, first, dtype)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model


def start_attention_as_similarity(model: MistralForCausalLM) -> None:
    """Each head's query projection starts as its key projection, so a token first attends to the tokens that look
    like it: "the triangle" finds the image tokens that hold "triangle" from the first step, and training refines
    the lookup instead of having to discover it (with rope_theta 1e6, in a proxy, the lookup formed or was forming by
    step 400-450 in each of three seeds, and did not form in 1200 steps with neither; docs/demo_experiments.md)."""
    with torch.no_grad():
        for layer in model.model.layers:
            attention = layer.self_attn
            size, group = attention.head_dim, attention.num_key_value_groups
            for head in range(model.config.num_attention_heads):
                kv = head // group
                attention.q_proj.weight[head * size:(head + 1) * size] = attention.k_proj.weight[kv * size:(kv + 1) * size]


def probe_chats(questions: int, seed: int) -> list[tuple[str, tuple]]:
    """(question type, scene chat) for at least `questions` questions, all the world asks about each of as many scenes
    of 2-3 shapes (one shape needs no lookup), each question asked alone right after the image."""
    rng = random.Random(f"{seed}-lookup-probe")
    rows = []
    while len(rows) < questions:
        _, shapes = world.sample_scene(rng)
        if len(shapes) >= 2:
            rows += [(kind, (shapes, world.chat_messages([(question, answer)]), False))
                     for kind, question, answer in world.questions(shapes, rng) if kind in world.VQA_TYPES]
    return rows


@torch.no_grad()
def lookup_accuracy(model, tokenizer, image_tokens: int, questions: int = 200, seed: int = 0) -> dict[str, float]:
    """Share of exactly right answers (teacher-forced) of the LLM stand-in per question type, on scenes in words: did it
    learn to find the object a question names before it sees an image? A stand-in that finds objects by colour but
    not by shape leaves the demo's colour answers near chance whatever the later stages do (docs/demo_experiments.md)."""
    rows = probe_chats(questions, seed)
    batches = SceneBatches(tokenizer, [chat for _, chat in rows], image_tokens)
    right = {kind: [] for kind in world.VQA_TYPES}
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), 64):
        index = torch.arange(start, min(start + 64, len(rows)))
        batch = batches.batch(index, model.get_input_embeddings())
        predicted = model(inputs_embeds=batch["inputs_embeds"], attention_mask=batch["attention_mask"]).logits.argmax(-1)
        for row, i in enumerate(index.tolist()):
            labels = batch["labels"][row, 1:]
            answer = labels != -100
            right[rows[i][0]].append(bool((predicted[row, :-1][answer] == labels[answer]).all()))
    model.train(was_training)
    return {kind: round(sum(r) / len(r), 3) for kind, r in right.items() if r}


class SceneBatches:
    """`world.scene_chats` as causal-LM batches of input embeddings: the image placeholder becomes one token per image
    patch, the sum of the embeddings of the words `world.scene_words` gives it (zero for an empty quadrant), and only
    the assistant's tokens carry labels. Chats are tokenized once; `batch` embeds with the model's current
    embeddings, so the words' embeddings learn from both the text and the scenes."""

    def __init__(self, tokenizer, chats: list, image_tokens: int):
        self.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
        vocabulary = tokenizer.get_vocab()
        self.rows = []
        for shapes, messages, plain in chats:
            encoded = tokenizer.apply_chat_template(
                messages, chat_template=PLAIN_CHAT_TEMPLATE if plain else CHAT_TEMPLATE, tokenize=True,
                return_dict=True, return_assistant_tokens_mask=True)
            ids = torch.tensor(encoded["input_ids"])
            labels = ids.masked_fill(torch.tensor(encoded["assistant_masks"]) == 0, -100)
            words = world.scene_words(shapes, image_tokens)
            if any("Ġ" + word not in vocabulary for token in words for word in token):
                raise ValueError("The tokenizer has no single token for some of the world's words; train it on the world's texts.")
            width = max(map(len, words))
            scene = torch.tensor([[vocabulary["Ġ" + word] for word in token] + [-1] * (width - len(token)) for token in words])
            self.rows.append((ids, labels, scene, int((ids == self.image_token_id).nonzero()[0])))

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, index: torch.Tensor, embeddings: torch.nn.Embedding) -> dict[str, torch.Tensor]:
        rows, labels = [], []
        for i in index.tolist():
            ids, label, scene, at = self.rows[i]
            image = (embeddings(scene.clamp(min=0)) * (scene >= 0)[..., None]).sum(1)
            rows.append(torch.cat([embeddings(ids[:at]), image, embeddings(ids[at + 1:])]))
            labels.append(torch.cat([label[:at], torch.full((len(scene),), -100), label[at + 1:]]))
        width = max(len(row) for row in rows)  # padded on the right: every chat starts at position 0
        return {
            "inputs_embeds": torch.stack([torch.nn.functional.pad(row, (0, 0, 0, width - len(row))) for row in rows]),
            "attention_mask": torch.stack([torch.arange(width) < len(row) for row in rows]).long(),
            "labels": torch.stack([torch.nn.functional.pad(label, (0, width - len(label)), value=-100) for label in labels]),
        }
