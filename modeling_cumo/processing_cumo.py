"""CuMo's processor: LLaVA's pad-to-square image processing, `<image>` expansion, and the CuMo chat template."""

import numpy as np
import PIL.Image
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava.processing_llava import LlavaProcessor


# Both templates write every special token of the prompt themselves and the processor's tokenizer adds none, so
# that each path that tokenizes a chat (the processor on the rendered text, `apply_chat_template(tokenize=True)`,
# TRL's collator, vLLM) gives the same ids: the original's. Its prompts start with two BOS (the template's literal
# `<s>` and the one its tokenizer adds). A message's images go first, each as `<image>` and a newline (where the
# original's CLI, evaluation and data pipeline put them), unless the text already places its `<image>`s itself.
# Contents are read with a `for` loop over `message['content']`, which is how vLLM recognises a multimodal template.
_MESSAGE_PARTS = (
    "{%- set ns = namespace(text='', images=0) -%}"
    "{%- if message['content'] is string -%}{%- set ns.text = message['content'] -%}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{%- set ns.text = ns.text + ('\\n' if ns.text else '') + part['text'] -%}"
    "{%- elif part['type'] in ('image', 'image_url') -%}{%- set ns.images = ns.images + 1 -%}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- set num_images = ns.images - ns.text.count('<image>') -%}"
)

# The original's `mistral_instruct_system` format (LLaMA-2 style with `<<SYS>>`), which the released checkpoints are
# evaluated and served with. A system message replaces the default system text; an empty one drops the block
# (the original's `mistral_instruct`). `{% generation %}` marks the tokens that `return_assistant_tokens_mask` and
# TRL's `assistant_only_loss` supervise: the original's training targets (the reply, its spaces and `</s>`).
CHAT_TEMPLATE = (
    "{%- set default_system = \"A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions.\" -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set message = messages[0] -%}" + _MESSAGE_PARTS + "{%- set system_message = ns.text -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set system_message = default_system -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{{- bos_token + bos_token -}}"
    "{%- for message in loop_messages -%}" + _MESSAGE_PARTS +
    "{%- if message['role'] == 'user' -%}{{- '[INST] ' -}}"
    "{%- if loop.first and system_message -%}{{- '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' -}}{%- endif -%}"
    "{{- '<image>\\n' * num_images + ns.text + ' [/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{%- generation -%}{{- ' ' + ns.text + ' ' + eos_token -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
)


# The original's `plain` format of pre-training (stage 1): one BOS, the images, the caption and a newline; no roles,
# no system text. Only the caption is marked for the loss.
PLAIN_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}" + _MESSAGE_PARTS +
    "{%- if message['role'] == 'user' -%}{{- '<image>' * num_images -}}"
    "{%- elif message['role'] == 'assistant' -%}{%- generation -%}{{- ns.text + '\\n' -}}{%- endgeneration -%}"
    "{%- endif -%}{%- endfor -%}"
)


def make_image_processor(image_size: int = 336, image_mean=None, image_std=None, crop: bool = True,
                         **kwargs) -> LlavaImageProcessorPil:
    """Pad to a square with the mean colour, resize the shortest edge to `image_size` (bicubic), centre-crop,
    rescale, normalise (CLIP's mean and std by default): the original's `image_aspect_ratio="pad"` preprocessing,
    bit-exact with PIL. `crop=False` resizes straight to `image_size` x `image_size` without a crop, as SigLIP's own
    processor does (LLaVA-style SigLIP models pad first, then that; pass SigLIP's mean and std, 0.5). `kwargs` go to
    the image processor (e.g. `resample`)."""
    kwargs.update({name: list(value) for name, value in (("image_mean", image_mean), ("image_std", image_std))
                   if value is not None})
    square = {"height": image_size, "width": image_size}
    return LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": image_size} if crop else square,
                                  do_center_crop=crop, crop_size=square, **kwargs)


def to_rgb_image(image):
    """Any PIL image as 8-bit RGB (16-bit, float, palette, CMYK, greyscale and alpha modes included); arrays and
    tensors pass through. Unreadable or empty images raise `ValueError`."""
    if not isinstance(image, PIL.Image.Image):
        if getattr(image, "size", 1) == 0 or 0 in getattr(image, "shape", (1,)):
            raise ValueError(f"Got an empty image of shape {tuple(image.shape)}.")
        return image
    if image.width == 0 or image.height == 0:
        raise ValueError(f"Got an image of size {image.width}x{image.height}; it needs at least one pixel.")
    try:
        image.load()
    except Exception as error:  # truncated or corrupt files fail here, with PIL's many exception types
        raise ValueError(f"Could not read the image: {error}") from error
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        image = PIL.Image.fromarray(np.clip(values / peak * 255.0, 0, 255).round().astype(np.uint8), mode="L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def _map_images(images, fn):
    if isinstance(images, (list, tuple)):
        return [_map_images(image, fn) for image in images]
    return fn(images)


class CuMoProcessor(LlavaProcessor):
    """Image processor + tokenizer + chat template. Each `<image>` in the text becomes one image token per patch of
    the base grid (S2 scales keep the grid), filled by the model with that image's features.

    The tokenizer's automatic BOS is turned off: the chat templates write every special token (see above)."""

    def __init__(self, image_processor=None, tokenizer=None, patch_size: int = 14, chat_template=None,
                 image_token: str = "<image>", num_additional_image_tokens: int = 1, **kwargs):
        if getattr(tokenizer, "add_bos_token", False):
            tokenizer.add_bos_token = False
        # CLIP prepends a CLS token (1), which the model drops ("default"); SigLIP has none (0): every token is a
        # patch feature ("full")
        strategy = "default" if num_additional_image_tokens else "full"
        super().__init__(image_processor, tokenizer, patch_size=patch_size, vision_feature_select_strategy=strategy,
                         chat_template=chat_template if chat_template is not None else CHAT_TEMPLATE,
                         image_token=image_token, num_additional_image_tokens=num_additional_image_tokens, **kwargs)

    def __call__(self, images=None, text=None, videos=None, audio=None, **kwargs):
        """Generic harnesses (lmms-eval's `huggingface` model) pass every modality, empty ones included
        (`videos=[]`, `audios=[]`): those are dropped; a video or audio input is refused, as CuMo reads neither."""

        def empty(value):
            return value is None or (isinstance(value, (list, tuple)) and all(empty(item) for item in value))

        for name, value in (("videos", videos), ("audio", audio), ("audios", kwargs.pop("audios", None))):
            if not empty(value):
                raise ValueError(f"CuMo reads images and text only; got `{name}`: pass none, or an empty list.")
        return super().__call__(images=images, text=text, **kwargs)

    def prepare_inputs_layout(self, images=None, text=None, videos=None, audio=None, **kwargs):
        try:
            images, text, videos, audio = super().prepare_inputs_layout(images, text, videos, audio, **kwargs)
        except (OSError, PIL.UnidentifiedImageError) as error:
            raise ValueError(f"Could not read an image: {error}") from error
        if images is not None:
            images = _map_images(images, to_rgb_image)
        return images, text, videos, audio

    def _adjust_assistant_masks_indices(self, processed_dict, generation_indices):
        # transformers (5.23+; older versions never call this) walks the offsets token by token: as a tensor (TRL's
        # collator asks for "pt") every step is a tensor op, a noticeable part of a small training step; lists are cheap
        offsets = processed_dict.get("offset_mapping")
        if hasattr(offsets, "tolist"):
            processed_dict["offset_mapping"] = offsets.tolist()
        return super()._adjust_assistant_masks_indices(processed_dict, generation_indices)


CuMoProcessor.register_for_auto_class()

__all__ = ["CuMoProcessor", "CHAT_TEMPLATE", "PLAIN_CHAT_TEMPLATE", "make_image_processor", "to_rgb_image"]
