"""Chat with a CuMo model about images: one Gradio app that runs the same locally and as a Hugging Face Space.

    python -m space.app --model PATH_OR_HUB_ID [--host 127.0.0.1] [--port 7860] [--max-context-tokens N]

The model comes from --model, else the CUMO_MODEL environment variable, else the demo model that
`cumo-demo --output demo` writes. Scripts can call a running app:
`gradio_client.Client(url).predict({"text": ..., "files": [handle_file(path)]}, api_name="/chat")`.
This file imports only torch, transformers, PIL and gradio (the model's code comes with the model, through
`trust_remote_code`), so it is also the Space's `app.py`.

What one conversation costs the server is bounded, whatever a visitor sends: a message has at most
`max_prompt_chars` characters and `max_images` images; the model sees at most `max_context_tokens` tokens of the
conversation (older turns are left out, and the visitor is told); a refused message never reaches the model, in its
own turn or later ones; and the user's text is text: the strings the chat template and tokenizer give a meaning
(`<s>`, `[INST]`, `<image>`, ...) are taken out of it, and the visitor is told.
"""

import argparse
import hashlib
import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr
import PIL.Image
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, TextIteratorStreamer

try:  # ZeroGPU Spaces: the GPU is attached for the duration of each decorated call
    import spaces

    gpu = spaces.GPU
except ImportError:
    def gpu(fn):
        return fn


DEMO_DIR = Path(os.environ.get("CUMO_DEMO_DIR", "demo"))  # where `cumo-demo --output demo` writes
EXAMPLE_IMAGE = Path(__file__).parent / "examples" / "shapes.png"
# A scene of the demo world and questions it asks about it (`trainer.demo.world.example_chats`, which has their
# answers; `cumo-demo` checks the demo model gives them)
EXAMPLE_QUESTIONS = ("How many shapes are there?", "What shape is the red object?", "Describe the image.")
TEMPLATE_MARKERS = ("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")  # CuMo's chat template's own (plain-text) markers
REFUSAL = "⚠️ "  # starts every message the app answers instead of the model; such turns are never sent back to it
EMPTY_ANSWER = "(the model gave an empty answer)"
DEFAULT_QUESTION = "Describe the image."  # asked when a message is only images
MESSAGE_SHAPE = ('A message is {"text": "your question", "files": [images]}; with gradio_client: '
                 'Client(url).predict({"text": "...", "files": [handle_file("photo.png")]}, api_name="/chat").')
TEMPERATURE, TOP_P = (0.0, 1.5), (0.05, 1.0)


class RequestError(ValueError):
    """Something the user sent that cannot be answered; its message is shown in the chat."""


def check_setting(label: str, value, low: float, high: float, whole: bool = False) -> float:
    """`value` if it is a (whole) number in [low, high], else a RequestError saying so (NaN and infinity included)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or not low <= value <= high or (whole and value != int(value))):
        kind = "a whole number" if whole else "a number"
        raise RequestError(f"{label} must be {kind} from {low:g} to {high:g}; got {value!r}.")
    return value


@dataclass
class Prompt:
    """What the model is given for one turn, and what the user should be told about it."""

    inputs: dict
    image_keys: list[str]
    dropped_exchanges: int = 0
    notices: list[str] = field(default_factory=list)


class ChatEngine:
    """A CuMo model and processor with the app's limits. Caches each image's features, so that a conversation encodes
    its images once however many turns it has; keeps nothing else between turns (the history comes with each one)."""

    def __init__(self, model_path: str, load_4bit: bool = False, load_8bit: bool = False, max_image_bytes: int = 10 << 20,
                 max_image_pixels: int = 4096 * 4096, max_prompt_chars: int = 2000, max_new_tokens: int = 512,
                 max_context_tokens: int | None = None, max_images: int = 4, cache_size: int = 32):
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        kwargs = {"dtype": torch.bfloat16 if self.device == "cuda" else torch.float32}
        if load_4bit or load_8bit:
            if self.device != "cuda":
                raise SystemExit("--load-4bit / --load-8bit need a CUDA GPU and bitsandbytes.")
            from transformers import BitsAndBytesConfig

            # routers, projector and vision tower stay unquantised (the model also declares them so)
            skip = ["vision_tower", "multi_modal_projector", "lm_head"]
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=load_4bit, load_in_8bit=load_8bit,
                                                               llm_int8_skip_modules=skip)
            kwargs["device_map"] = {"": 0}
        self.model = AutoModelForImageTextToText.from_pretrained(model_path, trust_remote_code=True, **kwargs).eval()
        if "device_map" not in kwargs:
            self.model.to(self.device)
        self.processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
        self.model_path = model_path
        self.max_image_bytes, self.max_image_pixels = max_image_bytes, max_image_pixels
        self.max_prompt_chars, self.max_new_tokens, self.max_images = max_prompt_chars, max_new_tokens, max_images
        # A turn's time and memory grow with the prompt's length, so the prompt has a budget: a CPU answers a few
        # thousand tokens in seconds, a GPU affords more. Never more than the model's positions leave for the answer.
        positions = getattr(self.model.config.text_config, "max_position_embeddings", None) or math.inf
        budget = max_context_tokens or (8192 if self.device == "cuda" else 2048)
        self.max_context_tokens = int(min(budget, positions - max_new_tokens))
        if self.max_context_tokens < 1:
            raise SystemExit(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in this model's "
                             f"{positions} positions.")
        tokenizer = self.processor.tokenizer
        control = set(TEMPLATE_MARKERS) | set(tokenizer.all_special_tokens) | {self.processor.image_token}
        control |= {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
        control = sorted((s for s in control if s), key=len, reverse=True)
        self._control = re.compile("|".join(map(re.escape, control)), re.IGNORECASE)
        self._longest_piece = max(map(len, tokenizer.get_vocab()))  # a text of n chars has >= n / this tokens
        self._image_tokens, self._exchange_tokens = self._measure_template()
        self._features: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _measure_template(self) -> tuple[int, int]:
        """Tokens per image, and the template's tokens around one earlier exchange: the history's estimates."""
        question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]}]
        exchange = [{"role": "user", "content": [{"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": "?"}]}]
        image = [PIL.Image.new("RGB", (8, 8))]
        alone = self._encode(question, image)["input_ids"][0]
        after = self._encode(exchange + question, image)["input_ids"][0]
        return int((alone == self.processor.image_token_id).sum()), len(after) - len(alone)

    def load_image(self, path) -> tuple[str, PIL.Image.Image]:
        """The image at `path` and its content hash, within the app's limits, or a RequestError."""
        if not isinstance(path, (str, os.PathLike)):
            raise RequestError(f"Each file must be an uploaded image; got {type(path).__name__}. {MESSAGE_SHAPE}")
        file = Path(path)
        if not file.is_file():
            raise RequestError("The uploaded file is missing; please upload it again.")
        if file.stat().st_size > self.max_image_bytes:
            raise RequestError(f"The image is larger than {self.max_image_bytes >> 20} MB; please upload a smaller one.")
        data = file.read_bytes()
        try:
            with PIL.Image.open(file) as image:
                if image.width * image.height > self.max_image_pixels:
                    raise RequestError(
                        f"The image is {image.width}x{image.height} pixels, more than this app accepts "
                        f"({self.max_image_pixels:,} pixels); please upload a smaller one."
                    )
                image.load()
                image = image.copy()
        except RequestError:
            raise
        except PIL.Image.DecompressionBombError as error:
            raise RequestError("The image declares far more pixels than it is safe to open; please upload a smaller "
                               "one.") from error
        except (OSError, ValueError, SyntaxError) as error:
            raise RequestError(f"That file is not an image this app can read ({type(error).__name__}).") from error
        if image.width == 0 or image.height == 0:
            raise RequestError("The image is empty.")
        return hashlib.sha256(data).hexdigest(), image

    def image_features(self, key: str, pixel_values: torch.Tensor):
        """Projected features of an image, computed once per distinct image (LRU cache by content hash)."""
        with self._lock:
            if key in self._features:
                self._features.move_to_end(key)
                return self._features[key]
        with torch.no_grad():
            features = self.model.get_image_features(pixel_values.to(self.device))
        with self._lock:
            self._features[key] = features
            while len(self._features) > self._cache_size:
                self._features.popitem(last=False)
        return features

    def plain_text(self, text: str) -> tuple[str, list[str]]:
        """`text` without the strings that the template or tokenizer would read as control tokens, and those found
        (removed until none is left, so that removing one cannot join two halves into another)."""
        found = []
        while matches := self._control.findall(text):
            found += matches
            text = self._control.sub("", text)
        return text, found

    def _exchanges(self, history) -> list[tuple[str, str, list]]:
        """(question, answer, image paths) of each answered turn of a gradio history, oldest first. Turns the app
        refused (or that got no answer) are left out, and so are questions it would refuse now (too long)."""
        if not isinstance(history, (list, tuple)):
            return []
        merged = []  # [role, texts, files]; gradio keeps an upload and its text as parts or as separate messages
        for turn in history:
            if not isinstance(turn, dict) or turn.get("role") not in ("user", "assistant"):
                continue
            texts, files = [], []
            content = turn.get("content")
            for part in content if isinstance(content, (list, tuple)) else [content]:
                if isinstance(part, str):
                    texts.append(part)
                elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                    texts.append(part["text"])
                elif isinstance(part, dict) and (part.get("path") or (part.get("file") or {}).get("path")):
                    files.append(part.get("path") or part["file"]["path"])
            if merged and merged[-1][0] == turn["role"]:
                merged[-1][1].extend(texts)
                merged[-1][2].extend(files)
            else:
                merged.append([turn["role"], texts, files])
        exchanges = []
        for (role, texts, files), following in zip(merged, merged[1:] + [None]):
            if role != "user" or following is None or following[0] != "assistant":
                continue
            question, answer = "\n".join(texts).strip(), "\n".join(following[1]).strip()
            if (answer.startswith(REFUSAL.strip()) or answer in ("", EMPTY_ANSWER)
                    or len(question) > self.max_prompt_chars or not (question or files)):
                continue
            exchanges.append((question or DEFAULT_QUESTION, answer, files))
        return exchanges

    def _encode(self, messages: list[dict], images: list[PIL.Image.Image]) -> dict:
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        return self.processor(images=images or None, text=[prompt], return_tensors="pt")

    def _count_tokens(self, text: str, room: int) -> int:
        """Tokens of `text`, or more than `room` without tokenizing a text that cannot fit."""
        if len(text) > room * self._longest_piece:
            return room + 1
        return len(self.processor.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prepare(self, message, history) -> Prompt:
        """The model's inputs for this turn: the newest exchanges of `history` that fit the token budget, the
        question, and the conversation's images (this message's, else the latest answered upload's), each `<image>`
        at the start of the first question."""
        if isinstance(message, str):
            message = {"text": message, "files": []}
        if not isinstance(message, dict):
            raise RequestError(MESSAGE_SHAPE)
        text, files = message.get("text") or "", message.get("files") or []
        if not isinstance(text, str) or not isinstance(files, (list, tuple)):
            raise RequestError(MESSAGE_SHAPE)
        text = text.strip()
        if len(text) > self.max_prompt_chars:
            raise RequestError(f"The message is longer than {self.max_prompt_chars} characters; please shorten it.")
        if len(files) > self.max_images:
            raise RequestError(f"This app reads at most {self.max_images} images per message; this one has "
                               f"{len(files)}.")
        files = [f.get("path") if isinstance(f, dict) else f for f in files]
        text, found = self.plain_text(text)
        text, notices = text.strip(), []
        if found:
            shown = ", ".join(dict.fromkeys(f"`{s}`" for s in found))
            notices.append(f"Left out of your message, as the model would read them as control tokens: {shown}.")
        if not text and not files:
            raise RequestError(notices[0] + " Please type a question." if found else "Please type a question.")
        exchanges = [(self.plain_text(q)[0], self.plain_text(a)[0], f) for q, a, f in self._exchanges(history)]
        if not files:
            files = next((f for _, _, f in reversed(exchanges) if f), [])[-self.max_images:]
        images = [self.load_image(path) for path in files]
        question = text or DEFAULT_QUESTION

        def messages(kept):
            turns = []
            for q, a, _ in kept:
                turns += [{"role": "user", "content": [{"type": "text", "text": q}]},
                          {"role": "assistant", "content": [{"type": "text", "text": a}]}]
            turns.append({"role": "user", "content": [{"type": "text", "text": question}]})
            turns[0]["content"][:0] = [{"type": "image"}] * len(images)
            return turns

        # Estimate from the texts, newest first, so that a long history is never tokenized whole; then check.
        budget = self.max_context_tokens
        used = self._count_tokens(question, budget) + len(images) * self._image_tokens
        keep = 0
        for q, a, _ in reversed(exchanges):
            used += self._count_tokens(q, budget) + self._count_tokens(a, budget) + self._exchange_tokens
            if used > budget:
                break
            keep += 1
        while True:
            kept = exchanges[len(exchanges) - keep:] if keep else []
            inputs = self._encode(messages(kept), [image for _, image in images])
            length = inputs["input_ids"].shape[1]
            if length <= budget or keep == 0:
                break
            keep -= 1
        if length > budget:
            raise RequestError(f"This message and its images make {length} tokens, more than this app gives one turn "
                               f"({budget}); please shorten it.")
        dropped = len(exchanges) - keep
        if dropped:
            notices.append(f"The model sees the last {keep} of {len(exchanges)} exchanges of this conversation: older "
                           f"ones are left out to stay within {budget} tokens per turn.")
        return Prompt(inputs, [key for key, _ in images], dropped, notices)

    def stream(self, message, history, temperature: float = 0.2, top_p: float = 0.9, max_new_tokens: int = 128,
               notify: Callable[[str], None] | None = None):
        """Yield the growing answer (without the template's spaces around it); `notify`, if given, receives what the
        user should know about the turn (older turns left out, control strings taken out)."""
        temperature = check_setting("Temperature", temperature, *TEMPERATURE)
        top_p = check_setting("Top-p", top_p, *TOP_P)
        max_new_tokens = int(check_setting("Max new tokens", max_new_tokens, 1, self.max_new_tokens, whole=True))
        prompt = self.prepare(message, history)
        for notice in prompt.notices if notify else ():
            notify(notice)
        inputs = dict(prompt.inputs)
        pixel_values = inputs.pop("pixel_values", None)
        generate_kwargs = dict(
            **{k: v.to(self.device) for k, v in inputs.items()},
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        if temperature > 0:
            generate_kwargs.update(temperature=float(temperature), top_p=float(top_p))
        if prompt.image_keys:
            generate_kwargs["mm_encoder_outputs"] = {"image": self._conversation_features(prompt.image_keys,
                                                                                          pixel_values)}
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        errors = []

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(**generate_kwargs, streamer=streamer)
            except Exception as error:  # surfaced in the chat below, after the streamer is released
                errors.append(error)
                streamer.end()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        answer = ""
        for chunk in streamer:
            answer += chunk
            if answer.strip():
                yield answer.strip()
        thread.join()
        if errors:
            raise errors[0]
        if not answer.strip():
            yield EMPTY_ANSWER

    def _conversation_features(self, keys: list[str], pixel_values: torch.Tensor):
        """The features of each image (cached one by one), joined in the prompt's order."""
        outputs = [self.image_features(key, pixel_values[i : i + 1]) for i, key in enumerate(keys)]
        if len(outputs) == 1:
            return outputs[0]
        first = outputs[0]
        return type(first)(**{name: torch.cat([output[name] for output in outputs])
                              for name, value in first.items() if torch.is_tensor(value)})


class MessageData(gr.MultimodalTextbox.data_model):
    """gradio's message payload; one that does not validate gets a message saying what a message is."""

    @classmethod
    def model_validate(cls, obj, *args, **kwargs):
        try:
            return super().model_validate(obj, *args, **kwargs)
        except ValueError as error:  # pydantic's ValidationError
            details = (error.errors() if hasattr(error, "errors") else None) or [{}]
            where = ".".join(map(str, details[0].get("loc", ()))) or "message"
            raise gr.Error(f"Not a chat message ({where}: {details[0].get('msg', error)}). {MESSAGE_SHAPE}") from None


def checked_inputs(textbox: gr.MultimodalTextbox, settings: list[gr.Slider]) -> None:
    """Give every API payload that gradio's own checks reject (they answer `{"error": null}`, or a message about
    their internals) a message in the app's words. Done on the instances: subclassing a gradio component makes
    gradio write a .pyi file beside this one."""
    textbox.data_model = MessageData
    textbox_preprocess = textbox.preprocess

    def message(payload):
        if payload is None:
            raise gr.Error(f"The message is missing. {MESSAGE_SHAPE}")
        return textbox_preprocess(payload)

    textbox.preprocess = message
    for slider in settings:
        def setting(payload, slider=slider, preprocess=slider.preprocess):
            try:
                check_setting(slider.label, payload, slider.minimum, slider.maximum, whole=slider.step == 1)
            except RequestError as error:
                raise gr.Error(str(error)) from None
            return preprocess(payload)

        slider.preprocess = setting


def build_app(engine: ChatEngine, concurrency_limit: int = 2, max_queue: int = 32) -> gr.Blocks:
    @gpu
    def chat(message, history, temperature=0.2, top_p=0.9, max_new_tokens=128):
        try:
            yield from engine.stream(message, history, temperature, top_p, max_new_tokens,
                                     notify=lambda text: gr.Warning(text))
        except RequestError as error:
            yield f"{REFUSAL}{error}"
        except Exception as error:  # one failed request must not take the app down for everyone else
            yield f"{REFUSAL}Something went wrong while answering ({type(error).__name__}: {error}). Please try again."

    examples = None
    if EXAMPLE_IMAGE.is_file():
        examples = [[{"text": question, "files": [str(EXAMPLE_IMAGE)]}, 0.0, 0.9, min(64, engine.max_new_tokens)]
                    for question in EXAMPLE_QUESTIONS]
    with gr.Blocks(title="CuMo chat") as app:
        gr.Markdown(f"# CuMo chat\nAsk about an image. Model: `{engine.model_path}`. A new upload replaces the "
                    f"conversation's images; several in one message (at most {engine.max_images}) are all used. "
                    f"The model sees the last {engine.max_context_tokens} tokens of a conversation.")
        textbox = gr.MultimodalTextbox(file_types=["image"], file_count="multiple",
                                       placeholder="Upload an image and ask about it")
        settings = [
            gr.Slider(*TEMPERATURE, value=0.2, step=0.05, label="Temperature (0 = greedy)", render=False),
            gr.Slider(*TOP_P, value=0.9, step=0.05, label="Top-p", render=False),
            gr.Slider(1, engine.max_new_tokens, value=min(128, engine.max_new_tokens), step=1, label="Max new tokens",
                      render=False),
        ]
        checked_inputs(textbox, settings)
        gr.ChatInterface(
            chat,
            multimodal=True,
            textbox=textbox,
            additional_inputs=settings,
            additional_inputs_accordion=gr.Accordion("Generation settings", open=False, render=False),
            examples=examples,
            api_name="chat",
            concurrency_limit=concurrency_limit,
            fill_height=True,
        )
    app.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)
    return app


def launch(app: gr.Blocks, **kwargs):
    """Start the app. Every failure reaches the caller as a message (gradio sends `{"error": null}` instead for the
    payloads its own components reject)."""
    return app.launch(show_error=True, **kwargs)


def default_model() -> str:
    """The demo model that `cumo-demo --output demo` writes; without it, how to get a model."""
    if (DEMO_DIR / "model" / "config.json").is_file():
        return str(DEMO_DIR / "model")
    raise SystemExit(f"No model to serve: pass --model PATH_OR_HUB_ID (or set CUMO_MODEL), or train the demo model "
                     f"first with `cumo-demo --output {DEMO_DIR}` (about 11-18 minutes on 2 CPU cores; --quick for a "
                     f"reduced one) and run this again from the same folder.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("CUMO_MODEL"),
                        help="CuMo folder or Hub id (default: $CUMO_MODEL, else the demo model in ./demo/model)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--load-4bit", action="store_true", help="load the language model in 4 bits (GPU)")
    parser.add_argument("--load-8bit", action="store_true", help="load the language model in 8 bits (GPU)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests answered at the same time")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting at most")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="upper limit of the answer length")
    parser.add_argument("--max-context-tokens", type=int, default=int(os.environ.get("CUMO_MAX_CONTEXT_TOKENS", 0)) or None,
                        help="tokens of a conversation the model sees per turn, older turns left out "
                             "(default: $CUMO_MAX_CONTEXT_TOKENS, else 2048 on a CPU, 8192 on a GPU)")
    parser.add_argument("--max-images", type=int, default=4, help="images per message at most")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    engine = ChatEngine(args.model or default_model(), load_4bit=args.load_4bit, load_8bit=args.load_8bit,
                        max_new_tokens=args.max_new_tokens, max_context_tokens=args.max_context_tokens,
                        max_images=args.max_images)
    launch(build_app(engine, args.concurrency, args.max_queue), server_name=args.host, server_port=args.port,
           share=args.share)


if __name__ == "__main__":
    main()
