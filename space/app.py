"""Chat with a CuMo model about an image: one Gradio app that runs the same locally and as a Hugging Face Space.

    python -m space.app --model PATH_OR_HUB_ID [--host 127.0.0.1] [--port 7860]

The model comes from --model, else the CUMO_MODEL environment variable, else the project's demo model. Scripts can
call a running app: `gradio_client.Client(url).predict({"text": ..., "files": [handle_file(path)]}, api_name="/chat")`.
This file imports only torch, transformers, PIL and gradio, so it is also the Space's `app.py`.
"""

import argparse
import hashlib
import os
import threading
from collections import OrderedDict
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


class RequestError(ValueError):
    """Something the user sent that cannot be answered; its message is shown in the chat."""


class ChatEngine:
    """A CuMo model and processor with the app's limits; caches each image's features so that a conversation
    encodes its image once, however many turns it has."""

    def __init__(self, model_path: str, load_4bit: bool = False, load_8bit: bool = False, max_image_bytes: int = 10 << 20,
                 max_image_pixels: int = 4096 * 4096, max_prompt_chars: int = 2000, max_new_tokens: int = 512,
                 cache_size: int = 32):
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
        self.max_prompt_chars, self.max_new_tokens = max_prompt_chars, max_new_tokens
        self._features: OrderedDict[str, object] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def load_image(self, path: str) -> tuple[str, PIL.Image.Image]:
        """The image at `path` and its content hash, within the app's limits, or a RequestError."""
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

    def prepare(self, message: dict, history: list[dict]):
        """Chat messages for the template, and the conversation's image (the latest upload) or None."""
        text = (message.get("text") or "").strip()
        files = list(message.get("files") or [])
        if not text and not files:
            raise RequestError("Please type a question.")
        if len(text) > self.max_prompt_chars:
            raise RequestError(f"The message is longer than {self.max_prompt_chars} characters; please shorten it.")
        image_path, turns = None, []
        for turn in history:
            content = turn.get("content")
            parts = content if isinstance(content, list) else [content]
            for part in parts:
                if isinstance(part, dict) and (part.get("path") or (part.get("file") or {}).get("path")):
                    if turn.get("role") == "user":
                        image_path = part.get("path") or part["file"]["path"]
                elif isinstance(part, dict) and part.get("type") == "text":
                    turns.append((turn.get("role"), part.get("text", "")))
                elif isinstance(part, str):
                    turns.append((turn.get("role"), part))
        if files:
            image_path = files[-1]
        image = None
        if image_path is not None:
            image = self.load_image(image_path)
        turns.append(("user", text or "Describe the image."))
        messages, previous = [], None
        for role, content in turns:
            if role not in ("user", "assistant") or not content:
                continue
            if role == previous:  # gradio keeps a file upload and its text as two user turns: join them
                messages[-1]["content"][-1]["text"] += "\n" + content
                continue
            messages.append({"role": role, "content": [{"type": "text", "text": content}]})
            previous = role
        if image is not None:
            first_user = next(m for m in messages if m["role"] == "user")
            first_user["content"].insert(0, {"type": "image"})
        return messages, image

    def stream(self, message: dict, history: list[dict], temperature: float = 0.2, top_p: float = 0.9,
               max_new_tokens: int = 128):
        """Yield the growing answer."""
        messages, image = self.prepare(message, history)
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = self.processor(images=[image[1]] if image else None, text=[prompt], return_tensors="pt")
        pixel_values = inputs.pop("pixel_values", None)
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        if limit and inputs["input_ids"].shape[1] + max_new_tokens > limit:
            raise RequestError("The conversation is too long for this model; press Clear and start a new one.")
        generate_kwargs = dict(
            **{k: v.to(self.device) for k, v in inputs.items()},
            max_new_tokens=int(min(max_new_tokens, self.max_new_tokens)),
            do_sample=temperature > 0,
            pad_token_id=self.processor.tokenizer.pad_token_id,
        )
        if temperature > 0:
            generate_kwargs.update(temperature=float(temperature), top_p=float(top_p))
        if image is not None:
            generate_kwargs["mm_encoder_outputs"] = {"image": self.image_features(image[0], pixel_values)}
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
            yield answer
        thread.join()
        if errors:
            raise errors[0]
        if not answer.strip():
            yield "(the model gave an empty answer)"


def build_app(engine: ChatEngine, concurrency_limit: int = 2, max_queue: int = 32) -> gr.Blocks:
    @gpu
    def chat(message, history, temperature=0.2, top_p=0.9, max_new_tokens=128):
        try:
            yield from engine.stream(message, history, temperature, top_p, max_new_tokens)
        except RequestError as error:
            yield f"⚠️ {error}"
        except Exception as error:  # one failed request must not take the app down for everyone else
            yield f"⚠️ Something went wrong while answering ({type(error).__name__}: {error}). Please try again."

    examples = None
    if EXAMPLE_IMAGE.is_file():
        examples = [
            [{"text": "What colour is the shape?", "files": [str(EXAMPLE_IMAGE)]}, 0.0, 0.9, min(64, engine.max_new_tokens)],
            [{"text": "Describe the image.", "files": [str(EXAMPLE_IMAGE)]}, 0.0, 0.9, min(64, engine.max_new_tokens)],
        ]
    with gr.Blocks(title="CuMo chat") as app:
        gr.Markdown(f"# CuMo chat\nAsk about an image. Model: `{engine.model_path}`. One image per conversation: "
                    "a new upload replaces it.")
        gr.ChatInterface(
            chat,
            multimodal=True,
            textbox=gr.MultimodalTextbox(file_types=["image"], file_count="single",
                                         placeholder="Upload an image and ask about it"),
            additional_inputs=[
                gr.Slider(0.0, 1.5, value=0.2, step=0.05, label="Temperature (0 = greedy)", render=False),
                gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", render=False),
                gr.Slider(1, engine.max_new_tokens, value=min(128, engine.max_new_tokens), step=1,
                          label="Max new tokens", render=False),
            ],
            additional_inputs_accordion=gr.Accordion("Generation settings", open=False, render=False),
            examples=examples,
            api_name="chat",
            concurrency_limit=concurrency_limit,
            fill_height=True,
        )
    app.queue(default_concurrency_limit=concurrency_limit, max_size=max_queue)
    return app


def default_model() -> str:
    """The project's demo model (`cumo-demo --output demo`); a reduced one is built first when it is missing."""
    if (DEMO_DIR / "model" / "config.json").is_file():
        return str(DEMO_DIR / "model")
    try:
        from trainer.demo.pipeline import QUICK, build_demo
    except ImportError:
        raise SystemExit("No model given: pass --model PATH_OR_ID or set CUMO_MODEL.") from None
    print(f"No model given and no demo model in {DEMO_DIR}/model: building a reduced one now (a few minutes). "
          f"For the full demo run `cumo-demo --output {DEMO_DIR}`; to serve another model pass --model PATH_OR_ID.")
    build_demo(DEMO_DIR, QUICK)
    return str(DEMO_DIR / "model")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("CUMO_MODEL"),
                        help="CuMo folder or Hub id (default: $CUMO_MODEL, else the demo model)")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--load-4bit", action="store_true", help="load the language model in 4 bits (GPU)")
    parser.add_argument("--load-8bit", action="store_true", help="load the language model in 8 bits (GPU)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests answered at the same time")
    parser.add_argument("--max-queue", type=int, default=32, help="requests waiting at most")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="upper limit of the answer length")
    parser.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    args = parser.parse_args(argv)
    engine = ChatEngine(args.model or default_model(), load_4bit=args.load_4bit, load_8bit=args.load_8bit,
                        max_new_tokens=args.max_new_tokens)
    build_app(engine, args.concurrency, args.max_queue).launch(server_name=args.host, server_port=args.port,
                                                               share=args.share)


if __name__ == "__main__":
    main()
