"""lmms-eval evaluates a CuMo checkpoint: `--model cumo` and the generic `--model huggingface` on tiny local copies of
POPE, MME, GQA and TextVQA (lmms-eval's own task configs and scoring functions, local parquet data), checked against
the same answers scored by hand; and the demo world's task `cumo_shapes` against the demo's own evaluation.

The tiny model answers with one word of a small vocabulary and then stops, so that its answers are scoreable and
differ from question to question. lmms-eval exits 0 even when an evaluation fails: every run must leave its
*_results.json. These tests need the `[eval]` extra; `.ci/run` runs them in a virtual environment of their own."""

import glob
import importlib.util
import inspect
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import tiny_config, tiny_processor


pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None,
                                reason="lmms-eval is not installed (pip install -e '.[eval]')")

ROOT = Path(__file__).resolve().parents[1]
WORLD_WORDS = ["yes", "no", "red", "green", "blue", "yellow", "purple", "circle", "square", "triangle", "one", "two",
               "three", "top left", "top right", "bottom left", "bottom right"]
BENCHMARK_WORDS = ["yes", "no"]


def answering_model(folder: Path, words: list[str], seed: int = 0) -> None:
    """Save a tiny CuMo that answers every question with one of `words`, picked by the image and the question, then
    ends: its LM head sees only what varies between prompts, and after an answer word only the end of the answer."""
    from tokenizers import AddedToken

    from modeling_cumo import CuMoForConditionalGeneration

    processor = tiny_processor()
    tokenizer = processor.tokenizer
    tokenizer.add_tokens([AddedToken(word, single_word=True, normalized=False) for word in words])
    ids = tokenizer.convert_tokens_to_ids(words)
    config = tiny_config(vision_experts=2, projector_experts=2, scales=(1,))
    config.text_config.vocab_size = len(tokenizer)
    torch.manual_seed(seed)
    model = CuMoForConditionalGeneration(config).eval()

    rng = random.Random(seed)
    images = [Image.new("RGB", (40, 40), tuple(rng.randrange(256) for _ in range(3))) for _ in range(8)]
    prompts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
        add_generation_prompt=True) for question in ("Is there a cat?", "What colour is it?", "How many?", "Where?") * 2]
    tokenizer.padding_side = "left"
    inputs = processor(images=images, text=prompts, padding=True, return_tensors="pt")
    embeddings = model.get_input_embeddings().weight
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        embeddings[ids] = torch.randn(embeddings.shape[1], generator=generator)  # one embedding for every answer word

        def last_hidden(next_id=None):
            batch = dict(inputs)
            if next_id is not None:
                batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((len(prompts), 1), next_id)], 1)
                batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(len(prompts), 1, dtype=torch.long)], 1)
            return model(**batch, output_hidden_states=True).hidden_states[-1][:, -1]

        before, after = last_hidden().mean(0), last_hidden(ids[0]).mean(0)  # what every prompt has in common
        shared = torch.linalg.qr(torch.stack([before, after]).T).Q
        rows = torch.randn(len(ids), embeddings.shape[1], generator=generator)
        rows -= rows @ shared @ shared.T  # the answer follows what differs from prompt to prompt ...
        start = before - (before @ after) / (after @ after) * after
        end = after - (after @ before) / (before @ before) * before
        head = torch.zeros_like(model.lm_head.weight)
        head[ids] = 10 * rows + 20 * start / (start @ before)  # ... and every answer word outranks every other token
        head[tokenizer.eos_token_id] = 10 * end / end.norm()  # after an answer word: the end
        model.lm_head.weight.copy_(head)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


def picture(rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (36, 30), tuple(rng.randrange(256) for _ in range(3)))
    image.paste(tuple(rng.randrange(256) for _ in range(3)), (rng.randrange(18), rng.randrange(15), 30, 26))
    return image


def benchmark_rows(rng: random.Random) -> dict[str, list[dict]]:
    """A few rows of each benchmark in the columns of its Hub dataset (GQA's image column is what lmms-eval's
    `gqa_process_docs` adds from its image set)."""
    objects = ["dog", "car", "chair", "cup", "person", "bottle", "tree", "bus", "cat", "bench", "clock", "kite", "bowl",
               "sink", "vase", "book"]
    pope = [{"id": str(i), "question_id": str(i), "question": f"Is there a {obj} in the image?",
             "answer": ("yes", "no")[i % 2], "image_source": f"COCO_val2014_{i:012d}", "image": picture(rng),
             "category": ("adversarial", "popular", "random")[i % 3]} for i, obj in enumerate(objects)]
    mme = []
    for i, category in enumerate(["color", "color", "count", "commonsense_reasoning", "commonsense_reasoning"]):
        image = picture(rng)  # MME asks two questions of each image, one answered Yes and one No
        for answer, colour in (("Yes", "red"), ("No", "green")):
            mme.append({"question_id": f"{category}/{i:04d}.png", "image": image, "category": category, "answer": answer,
                        "question": f"Is the object {colour}? Please answer yes or no."})
    gqa = [{"id": f"2{i:07d}", "imageId": f"n{i:06d}", "question": question, "answer": answer, "fullAnswer": answer,
            "isBalanced": True, "semanticStr": "", "image": picture(rng)}
           for i, (question, answer) in enumerate([("Is the sky blue?", "yes"), ("Is it a dog?", "no"),
                                                   ("What colour is the car?", "red"), ("How many cups?", "two"),
                                                   ("Is the door open?", "no"), ("What colour is the bus?", "red")])]
    textvqa = []
    for i, (question, given) in enumerate([("what colour is the sign?", ["red"] * 4 + ["blue"] * 6),
                                           ("how many bottles?", ["two"] * 10), ("is it open?", ["yes"] * 2 + ["no"] * 8),
                                           ("what does it say?", ["stop"] * 10), ("is this a bus?", ["yes"] * 10),
                                           ("which team?", ["no"] * 1 + ["red"] * 9)]):
        textvqa.append({"image_id": f"{i:016x}", "question_id": 34602 + i, "question": question,
                        "question_tokens": question.rstrip("?").split(), "image": picture(rng), "image_width": 36,
                        "image_height": 30, "flickr_original_url": "", "flickr_300k_url": "", "answers": given,
                        "image_classes": ["Sign"], "set_name": "val", "ocr_tokens": []})
    return {"pope": pope, "mme": mme, "gqa": gqa, "textvqa": textvqa}


# lmms-eval's own yaml files for each benchmark (in the installed lmms_eval/tasks), the folder of its utils
SOURCES = {"pope": ("pope", ["pope.yaml"]), "mme": ("mme", ["mme.yaml"]), "gqa": ("gqa", ["gqa.yaml"]),
           "textvqa": ("textvqa", ["_default_template_textvqa_yaml", "textvqa_val.yaml"])}
DATA_KEYS = ("task", "dataset_path", "dataset_name", "dataset_kwargs", "process_docs", "include")


def local_task(name: str, data_file: Path) -> str:
    """lmms-eval's own config of `name`, with its data read from `data_file` and its functions imported from lmms-eval
    (`!function lmms_eval.tasks.pope.utils.pope_doc_to_visual`, ...)."""
    import lmms_eval.tasks

    folder, files = SOURCES[name]
    source = "\n".join((Path(lmms_eval.tasks.__file__).parent / folder / file).read_text() for file in files)
    kept, dropping = [], False
    for line in source.splitlines():
        key = re.match(r"^([A-Za-z_]+):", line)
        if key:
            dropping = key.group(1) in DATA_KEYS
        if not dropping:
            kept.append(line.replace("!function utils.", f"!function lmms_eval.tasks.{folder}.utils."))
    split = re.search(r"^test_split:\s*(\S+)", source, re.M).group(1)
    header = [f"task: cumo_test_{name}", "dataset_path: parquet", "dataset_kwargs:", "  data_files:",
              f"    {split}: {data_file}"]
    return "\n".join(header + kept) + "\n"


def run_lmms_eval(args: list[str], cwd: Path, output: Path, launcher: tuple[str, ...] = ("-m",)
                  ) -> tuple[dict, dict[str, dict[int, dict]]]:
    """Run `python -m lmms_eval ARGS --output_path OUTPUT --log_samples` (or through another launcher, e.g. torchrun's
    module); return its results (with its output under "log") and, per task, the logged sample of each document."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(output / "hf"),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, *launcher, "lmms_eval", *args, "--output_path", str(output), "--log_samples"],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    found = glob.glob(str(output / "**" / "*_results.json"), recursive=True)
    assert run.returncode == 0 and len(found) == 1, (run.returncode, found, run.stdout[-2000:], run.stderr[-6000:])
    results = json.loads(Path(found[0]).read_text())
    results["log"] = run.stdout + run.stderr
    samples = {}
    for task in results["results"]:
        (path,) = glob.glob(str(Path(found[0]).parent / f"*_samples_{task}.jsonl"))
        samples[task] = {row["doc_id"]: row for row in map(json.loads, Path(path).read_text().splitlines())}
    return results, samples


def answer(sample: dict) -> str:
    given = sample["filtered_resps"]
    return given[0] if isinstance(given, list) else given


def reference_answers(model_dir: Path, rows: list[dict], prompts: list[str], max_new_tokens: int, dtype) -> list[str]:
    """Each question alone (no batching), through the checkpoint's chat template and a greedy `generate`."""
    from modeling_cumo import CuMoForConditionalGeneration, CuMoProcessor

    model = CuMoForConditionalGeneration.from_pretrained(model_dir, dtype=dtype).eval()
    processor = CuMoProcessor.from_pretrained(model_dir)
    answers = []
    for row, prompt in zip(rows, prompts):
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}], add_generation_prompt=True)
        inputs = processor(images=[row["image"].convert("RGB")], text=[text], return_tensors="pt")
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def pope_by_hand(predictions: list[str], truths: list[str]) -> dict:
    p = [x.lower().strip() for x in predictions]
    tp = sum(x == "yes" and t == "yes" for x, t in zip(p, truths))
    fp = sum(x == "yes" and t == "no" for x, t in zip(p, truths))
    fn = sum(x == "no" and t == "yes" for x, t in zip(p, truths))
    precision = tp / (tp + fp) if tp + fp else 0
    recall = tp / (tp + fn) if tp + fn else 0
    return {"pope_accuracy": sum(x == t for x, t in zip(p, truths)) / len(p), "pope_precision": precision,
            "pope_recall": recall, "pope_f1_score": 2 * precision * recall / (precision + recall) if precision + recall else 0,
            "pope_yes_ratio": truths.count("yes") / len(truths)}


def mme_by_hand(rows: list[dict], predictions: list[str]) -> dict:
    """Per category: accuracy plus accuracy+ (both questions of an image right), in percent, averaged over images;
    summed over the perception and the cognition categories."""
    right = {}
    for row, given in zip(rows, predictions):
        word = given.lower().strip().replace(".", "")
        right.setdefault(row["category"], {}).setdefault(row["question_id"], []).append(word == row["answer"].lower())
    scores = {category: sum(100 * sum(pair) / 2 + 100 * all(pair) for pair in images.values()) / len(images)
              for category, images in right.items()}
    return {"mme_perception_score": sum(s for c, s in scores.items() if c != "commonsense_reasoning"),
            "mme_cognition_score": scores["commonsense_reasoning"]}


def vqa_accuracy_by_hand(prediction: str, answers: list[str]) -> float:
    """The VQA metric: for each of the ten answers left out in turn, min(1, matches among the other nine / 3)."""
    return sum(min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))) / len(answers)


@pytest.fixture(scope="module")
def benchmarks(tmp_path_factory):
    """The tiny model, and the four tiny benchmarks as parquet files with their task yamls in one folder."""
    import datasets

    root = tmp_path_factory.mktemp("lmms_eval")
    answering_model(root / "model", BENCHMARK_WORDS)
    rows = benchmark_rows(random.Random(3))
    (root / "tasks").mkdir()
    for name, table in rows.items():
        data = datasets.Dataset.from_list(table)
        data.cast_column("image", datasets.Image()).to_parquet(root / f"{name}.parquet")
        (root / "tasks" / f"cumo_test_{name}.yaml").write_text(local_task(name, root / f"{name}.parquet"))
    return root, rows


def check_answers_and_prompts(samples: dict, rows: dict, model_dir: Path, dtype) -> dict[str, list[str]]:
    """Answers as lmms-eval logged them, per benchmark in row order, equal to those of a plain greedy `generate`."""
    answers = {}
    for name, table in rows.items():
        logged = samples[f"cumo_test_{name}"]
        assert sorted(logged) == list(range(len(table)))
        prompts = [logged[i]["input"] for i in range(len(table))]
        assert all(row["question"].split("?")[0].lower() in prompt.lower() for row, prompt in zip(table, prompts))
        answers[name] = [answer(logged[i]) for i in range(len(table))]
        assert answers[name] == reference_answers(model_dir, table, prompts, 16, dtype), name
    return answers


def test_cumo_model_scores_tiny_pope_mme_gqa_textvqa_as_scored_by_hand(benchmarks):
    root, rows = benchmarks
    tasks = ",".join(f"cumo_test_{name}" for name in rows)
    results, samples = run_lmms_eval(
        ["--model", "cumo", "--model_args", f"pretrained={root / 'model'},device=cpu", "--tasks", tasks,
         "--include_path", str(root / "tasks"), "--batch_size", "3"], cwd=root, output=root / "cumo")
    answers = check_answers_and_prompts(samples, rows, root / "model", torch.float32)
    # the tiny model's answers differ between questions, and are right for some and wrong for others
    assert len(set(answers["pope"])) >= 2 and set(answers["pope"] + answers["mme"]) <= set(BENCHMARK_WORDS)

    metrics = {task: {key.split(",")[0]: value for key, value in values.items() if key.endswith(",none")}
               for task, values in results["results"].items()}
    expected_pope = pope_by_hand(answers["pope"], [row["answer"] for row in rows["pope"]])
    assert 0 < expected_pope["pope_accuracy"] < 1
    for key, value in expected_pope.items():
        assert metrics["cumo_test_pope"][key] == pytest.approx(value, abs=1e-9), key
    for key, value in mme_by_hand(rows["mme"], answers["mme"]).items():
        assert metrics["cumo_test_mme"][key] == pytest.approx(value, abs=1e-9), key
    gqa = [given.strip().lower() == row["answer"] for given, row in zip(answers["gqa"], rows["gqa"])]
    assert metrics["cumo_test_gqa"]["exact_match"] == pytest.approx(sum(gqa) / len(gqa), abs=1e-9)
    textvqa = [vqa_accuracy_by_hand(given.strip(), row["answers"]) for given, row in zip(answers["textvqa"], rows["textvqa"])]
    assert metrics["cumo_test_textvqa"]["exact_match"] == pytest.approx(sum(textvqa) / len(textvqa), abs=1e-9)
    # the tasks' own generation settings reached the model (the original's greedy decoding, their own lengths)
    assert results["configs"]["cumo_test_pope"]["generation_kwargs"]["max_new_tokens"] == 128
    assert results["configs"]["cumo_test_mme"]["generation_kwargs"]["do_sample"] is False


def test_generic_huggingface_model_gives_the_same_answers(benchmarks):
    """lmms-eval's `huggingface` class loads the checkpoint's remote code, always in bfloat16, and passes `videos=[]`,
    `audios=[]` to the processor: its answers are a plain greedy `generate`'s in bfloat16, as `--model cumo`'s are in
    its dtype."""
    root, rows = benchmarks
    tasks = ",".join(f"cumo_test_{name}" for name in rows)
    _, samples = run_lmms_eval(
        ["--model", "huggingface", "--model_args",
         f"pretrained={root / 'model'},trust_remote_code=True,device=cpu,device_map=cpu", "--tasks", tasks,
         "--include_path", str(root / "tasks")], cwd=root, output=root / "huggingface")
    check_answers_and_prompts(samples, rows, root / "model", torch.bfloat16)


@pytest.fixture(scope="module")
def shapes_run(tmp_path_factory):
    """A demo-format folder (held-out split where `cumo-demo --output demo` writes it, a model in demo/model) and
    `lmms_eval --model cumo --model_args pretrained=demo/model --tasks cumo_shapes` run in it."""
    from trainer.demo import world

    root = tmp_path_factory.mktemp("shapes")
    world.write_split(root / "demo" / "work" / "data", "heldout", 30, 64, seed=1)
    answering_model(root / "demo" / "model", WORLD_WORDS)
    args = ["--model", "cumo", "--model_args", "pretrained=demo/model", "--tasks", "cumo_shapes",
            "--include_path", str(ROOT / "evaluation" / "tasks"), "--batch_size", "8"]
    return root, args, run_lmms_eval(args, cwd=root, output=root / "out")


def test_cumo_shapes_task_equals_the_demo_evaluation(shapes_run):
    from modeling_cumo import CuMoForConditionalGeneration, CuMoProcessor
    from trainer.demo import evaluate, world

    root, _, (results, samples) = shapes_run
    data = root / "demo" / "work" / "data"
    model = CuMoForConditionalGeneration.from_pretrained(root / "demo" / "model").eval()
    processor = CuMoProcessor.from_pretrained(root / "demo" / "model")
    heldout = json.loads((data / "heldout_vqa.json").read_text())
    demo = evaluate.vqa_accuracy(model, processor, heldout, data)
    got = {key.split(",")[0]: value for key, value in results["results"]["cumo_shapes"].items() if key.endswith(",none")}
    assert len(samples["cumo_shapes"]) == demo["vqa_questions"] == len(heldout)
    assert 0 < demo["vqa_accuracy"] < 1
    assert got["vqa_accuracy"] == pytest.approx(demo["vqa_accuracy"], abs=1e-12)
    assert {kind: got[f"{kind}_accuracy"] for kind in demo["accuracy_per_type"]} == pytest.approx(demo["accuracy_per_type"], abs=1e-12)
    assert set(demo["accuracy_per_type"]) == set(world.VQA_TYPES)
    # the demo's decoding: greedy, as many new tokens, no stop string
    settings = results["configs"]["cumo_shapes"]["generation_kwargs"]
    assert settings["max_new_tokens"] == inspect.signature(evaluate.vqa_accuracy).parameters["max_new_tokens"].default
    assert settings["do_sample"] is False and settings["until"] == []


def test_two_processes_share_the_questions_and_give_the_same_answers(shapes_run):
    """Data parallel as on several GPUs (`accelerate launch --num_processes N -m lmms_eval`), here two CPU processes
    under torchrun: each answers its share, and the gathered answers and metrics are those of one process."""
    root, args, (results, samples) = shapes_run
    two_results, two_samples = run_lmms_eval(args, cwd=root, output=root / "two",
                                             launcher=("-m", "torch.distributed.run", "--nproc_per_node", "2", "-m"))
    assert {i: answer(row) for i, row in two_samples["cumo_shapes"].items()} == \
        {i: answer(row) for i, row in samples["cumo_shapes"].items()}
    assert "Running on rank 1" in two_results["log"] and "Running on rank 1" not in results["log"]
    numbers = [{key: value for key, value in r["results"]["cumo_shapes"].items() if isinstance(value, float)}
               for r in (results, two_results)]
    assert "vqa_accuracy,none" in numbers[0] and numbers[1] == pytest.approx(numbers[0], abs=1e-12)
