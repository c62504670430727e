"""lmms-eval's `cumo` model: any CuMo checkpoint (a folder or a Hub id) evaluated the way the original evaluates it.

    python -m lmms_eval --model cumo --model_args pretrained=PATH_OR_ID[,dtype=bfloat16,device=cuda] \
        --tasks pope,mme,gqa --batch_size 8
    accelerate launch --num_processes 8 -m lmms_eval --model cumo --model_args pretrained=... --tasks ...

Each request is the task's own messages (its images, then its prompt) in the checkpoint's chat template, answered
greedily unless the task asks to sample, in batches padded on the left. The checkpoint is loaded with this
package's classes (no remote code runs), so a Hub id and a local folder are evaluated by the same tested code.
"""

import os

import torch
from accelerate import Accelerator
from loguru import logger

from lmms_eval import utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.progress import make_progress
from lmms_eval.protocol import ChatMessages
from modeling_cumo import CuMoForConditionalGeneration, CuMoProcessor


DEFAULT_MAX_NEW_TOKENS = 128  # the original's evaluation scripts; a task's own `max_new_tokens` wins


def truncate_at_stops(text: str, stops: list[str]) -> str:
    """The answer up to the first of the task's stop strings (its `until`)."""
    for stop in stops:
        if stop:
            text = text.split(stop)[0]
    return text


class CuMo(lmms):
    """Chat model: receives each request's `doc_to_messages`, so the task's images and prompt reach the chat template
    as the task wrote them. One process per GPU under `accelerate launch`, each answering its share of the requests."""

    is_simple = False

    def __init__(self, pretrained: str, revision: str = "main", device: str | None = None, dtype: str = "auto",
                 batch_size: int | str = 1, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 attn_implementation: str | None = None, max_batch_size=None):  # lmms-eval passes max_batch_size
        super().__init__()
        if str(batch_size).startswith("auto"):
            raise ValueError("--model cumo needs a number for --batch_size (automatic sizing is not supported).")
        self.accelerator = accelerator = Accelerator()
        if accelerator.num_processes > 1:  # one process per GPU (or CPU processes), each its own share of requests
            device = accelerator.device
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

        dtype = dtype if dtype == "auto" or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
        load = {"revision": revision, "dtype": dtype}
        if attn_implementation:
            load["attn_implementation"] = attn_implementation
        self._model = CuMoForConditionalGeneration.from_pretrained(pretrained, **load).to(self._device).eval()
        self.processor = CuMoProcessor.from_pretrained(pretrained, revision=revision)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues every row from its last token
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if int(os.environ.get("RANK", self._rank)) == 0:  # torchrun on CPUs: accelerate sees one process
            logger.info(f"CuMo from {pretrained}: {self._world_size} process(es), {self._device}, {self._model.dtype}, "
                        f"batch size {self.batch_size_per_gpu} per process")

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def messages(self, request_args) -> list[dict]:
        _, doc_to_messages, _, doc_id, task, split = request_args
        chat = ChatMessages(messages=doc_to_messages(self.task_dict[task][split][doc_id]))
        _, videos, audios = chat.extract_media()
        if videos or audios:
            raise ValueError(f"{task}: CuMo reads images and text only; this task gives it video or audio.")
        return chat.to_hf_messages()

    def generation_kwargs(self, task_kwargs: dict) -> tuple[dict, list[str]]:
        """transformers' `generate` arguments from a task's `generation_kwargs`, and its stop strings."""
        task_kwargs = dict(task_kwargs)
        stops = task_kwargs.pop("until", None) or []
        stops = [stops] if isinstance(stops, str) else list(stops)
        temperature = float(task_kwargs.get("temperature") or 0)
        kwargs = {"max_new_tokens": int(task_kwargs.get("max_new_tokens") or self.max_new_tokens),
                  "num_beams": int(task_kwargs.get("num_beams") or 1), "do_sample": temperature > 0}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_p=float(task_kwargs.get("top_p") or 1.0))
        return kwargs, stops

    @torch.no_grad()
    def generate_until(self, requests) -> list[GenerationResult]:
        # Grouped by generation settings, longest prompts first so that a batch holds prompts of similar lengths
        collator = utils.Collator([request.args for request in requests], lambda args: (-len(args[0]), args[0]),
                                  group_fn=lambda args: args[2], grouping=True)
        progress = make_progress(total=len(requests), desc="CuMo answering", disable=self._rank != 0)
        results = []
        pad_token_id = self.tokenizer.pad_token_id
        pad_token_id = self.tokenizer.eos_token_id if pad_token_id is None else pad_token_id
        for chunk in collator.get_batched(n=self.batch_size, batch_fn=None):
            conversations = [self.messages(args) for args in chunk]
            prompts = [self.processor.apply_chat_template(messages, add_generation_prompt=True)
                       for messages in conversations]
            images = [part["image"] for messages in conversations for message in messages
                      for part in message["content"] if part["type"] == "image"]
            inputs = self.processor(images=images or None, text=prompts, padding=True, return_tensors="pt")
            inputs = inputs.to(self._device)
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(self._model.dtype)
            kwargs, stops = self.generation_kwargs(chunk[0][2])
            output = self._model.generate(**inputs, **kwargs, pad_token_id=pad_token_id)
            new_tokens = output[:, inputs["input_ids"].shape[1]:]
            answers = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            for args, prompt, answer, tokens in zip(chunk, prompts, answers, new_tokens):
                answer = truncate_at_stops(answer, stops)
                count = int((tokens != pad_token_id).sum())
                results.append(GenerationResult(text=answer, token_counts=TokenCounts(output_tokens=count)))
                self.cache_hook.add_partial("generate_until", (prompt, args[2]), answer)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def loglikelihood(self, requests):
        raise NotImplementedError("--model cumo answers generation tasks (output_type: generate_until) only.")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("--model cumo answers single-round tasks only.")
