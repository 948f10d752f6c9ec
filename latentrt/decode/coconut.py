"""Coconut decoding (continuous thought on GPT-2): thoughts in the prompt, then ordinary answer tokens.

The prompt's ``<|latent|>`` positions are continuous thoughts: each takes as input the previous position's last
hidden state, in a single-position pass (the last one opens the prompt's final chunk, as the published passes
run; models/coconut.py, ``run_prompt``). ``num_thoughts=k`` appends ``<|start-latent|>``, k x ``<|latent|>``,
``<|end-latent|>`` to every prompt (by default the trained count to each prompt that carries no markers: a
batch's prompts each as alone), after a newline that ends a text prompt, as the published data format has it
(``question + "\n"``, then the markers). Answer tokens are single-position passes too; both go through the
backend's column runner where it has one (fused layers, one CUDA graph), else through the model's modules.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from ..caller import warn_at_caller
from ..checkpoint import read_training_info
from ..errors import CheckpointError, InputError, check_bool, check_int, is_choice
from ..kernels.reference import nonfinite_flags
from ..options import GenerateOptions
from ..prompts import Batch, left_padded, prompt_ids
from .base import Decoder, TokenOutput

PROMPT_MODES = ("coconut", "cot", "nocot", "pause", "nothoughts")  # the formats a Coconut model is trained and
# asked in (nothoughts: the question alone, as cot / nocot)
THOUGHT_MODES = ("coconut", "pause")  # prompt formats with thought markers (pause: ordinary tokens there)


def trained_mode(model) -> tuple[str, dict]:
    """The prompt format a model was trained in (its training.json's mode, one of PROMPT_MODES; "coconut"
    without one) and the file's fields; a mode the trainers would not write is a CheckpointError naming it."""
    folder = getattr(model, "folder", None)
    info = read_training_info(folder)
    mode = info.get("mode", "coconut")
    if not is_choice(mode, PROMPT_MODES):
        raise CheckpointError(f"{folder}/training.json: mode must be one of {list(PROMPT_MODES)}, got {mode!r}")
    return mode, info


def trained_thoughts(model) -> tuple[str, int]:
    """The prompt format and thought count a model was trained with (its training.json; the trainers write
    a mode of PROMPT_MODES and the curriculum), or ("coconut", 0). The count is Coconut's run.py's at the
    stage the weights were saved in (training.json's ``stage``; a file without one: the last):
    min(stage, max_stage) x thoughts per step, so a checkpoint of a run stopped at stage 2 thinks 2 x c, as
    it trained and as run.py evaluates it then. A field the trainers would not write is a CheckpointError
    naming the file (read as "no thoughts", it would change every answer silently)."""
    mode, info = trained_mode(model)
    return mode, _trained_count(model, mode, info)


def _trained_count(model, mode: str, info: dict) -> int:
    """``trained_thoughts``' count from the model's training.json fields ``info`` (read once by the caller)."""
    source = f"{getattr(model, 'folder', None)}/training.json"
    if mode not in THOUGHT_MODES:
        return 0
    stages, per_stage = info.get("max_stage", 0), info.get("thoughts_per_step", 1)
    try:
        check_int("max_stage", stages, 0)
        check_int("thoughts_per_step", per_stage, 0)
        stage = info.get("stage", stages)
        check_int("stage", stage, 0)
    except InputError as exc:  # the file's fault, not the caller's
        raise CheckpointError(f"{source}: {exc}") from None
    return min(stage, stages) * per_stage


def default_thoughts(model) -> int:
    """The thoughts appended to a prompt without markers when none are asked for: the trained count
    (``trained_thoughts``). A loaded model with latent markers but no training.json (Coconut's published
    ``checkpoint_N`` loaded with ``weights=``, a converted folder) has no count to give: 0, said in a warning
    (run.py evaluates its ProsQA model with 6 thoughts; without one, every answer comes from no thought)."""
    mode, info = trained_mode(model)  # (one read of training.json: generate() asks at every prompt)
    folder = getattr(model, "folder", None)
    if folder is not None and not info and model.marker_ids[1] is not None:
        warn_at_caller(
            f"{getattr(model, 'source', None) or folder} has latent markers but no training.json saying how many "
            "thoughts it was trained with, so none are appended: give the count (num_thoughts=, --thoughts; "
            "Coconut's published ProsQA and GSM8k models think 6)",
            UserWarning,
        )
    return _trained_count(model, mode, info)


NO_MARKERS = "this model has no latent markers: pass their ids to load() (latent_id=, start_latent_id=, end_latent_id=)"


def thought_prompt(tokenizer, question: str, thoughts: int | None, markers: tuple | None = None) -> list[int]:
    """The Coconut prompt: the question and a newline (the published data format: its dataset.py encodes
    ``question + "\n"``), then ``<|start-latent|>``, k x ``<|latent|>``, ``<|end-latent|>`` (no markers with
    ``thoughts=None``: the CoT / no-CoT formats). ``markers``: their (start, latent, end) ids, a model's
    ``marker_ids`` (default: the tokenizer's tokens of those names); none is an InputError."""
    ids = prompt_ids(tokenizer.encode(question + "\n"))
    if thoughts is None:
        return ids
    names = ("<|start-latent|>", "<|latent|>", "<|end-latent|>")
    start, latent, end = markers if markers is not None else tuple(tokenizer.token_to_id(n) for n in names)
    if latent is None:
        raise InputError(NO_MARKERS)
    return ids + [start] + [latent] * thoughts + [end]


class CoconutDecoder(Decoder):
    TITLE = "Coconut continuous-thought"
    OPTIONS = frozenset({"num_thoughts", "append_thoughts", "published_eos", "published_recompute"})
    GENERATE_ONLY = frozenset({"published_recompute"})  # (a server's passes run over its pool's cache)

    @classmethod
    def check_options(cls, model, options: GenerateOptions) -> None:
        check_bool("published_eos", options.published_eos)
        check_bool("published_recompute", options.published_recompute)
        if options.published_recompute and options.hooks:
            raise InputError("published_recompute runs the published generate's passes, which take no hooks")
        check_bool("append_thoughts", options.append_thoughts)
        k = options.num_thoughts
        if k is None:
            return
        if not options.append_thoughts:
            raise InputError(f"num_thoughts={k!r} appends thoughts and append_thoughts=False appends none: give one")
        # (bounded before the markers are built: num_thoughts=10**9 made a list of a billion ids first)
        block = model.config.block_size
        check_int("num_thoughts", k, 0, block, high_label=f"{block} (the model's context)")
        if model.marker_ids[1] is None:
            raise InputError(NO_MARKERS)

    def __init__(self, model, options: GenerateOptions, hooks) -> None:
        super().__init__(model, options, hooks)
        self._answer = None  # (the answer-token runner or None,) once made
        # published_eos: Coconut's generate never stops on its first answer token, and leaves out the eos
        # that ends a later one (latentrt's default, as HF: any stop token ends the answer and is kept)
        self.keep_stop_token = not options.published_eos
        # published_recompute: each row's input embeddings so far (its real positions, [n, d]), run whole for
        # each answer token after the first, as Coconut's generate runs them (``_recomputed``)
        self._sequences: list[Tensor] | None = None

    SCORES_PROMPTS = True

    def prompt_logits(self, ids: Tensor) -> Tensor:
        """One forward of the prompt as the model runs it (its ``<|latent|>`` positions continuous thoughts:
        ``model.logits``); a prompt without markers (``append_thoughts=False``) is scored as plain GPT-2."""
        return self.model.logits(ids[None])[0]

    def stops_at(self, index: int) -> bool:
        return index > 0 or not self.options.published_eos

    def thoughts_per_sequence(self, batch: Batch) -> list[int]:
        """The ``<|latent|>`` positions of each prompt as run (0 each where the model runs them as ordinary tokens,
        the pause baseline)."""
        latent = self.model.marker_ids[1]
        if latent is None or not self.model.continuous_thoughts:
            return [0] * batch.ids.shape[0]
        return ((batch.ids == latent) & batch.mask).sum(1).tolist()

    def _thoughts_to_append(self, carries_markers: list[bool]) -> list[int | None]:
        """Per prompt, the k thoughts to append (None: none): ``num_thoughts=k`` to every prompt, or by default
        the count the model was trained with (its training.json) to each prompt that carries no latent markers
        (``carries_markers``), so a batch's prompts are each extended as they would be alone; none with
        ``append_thoughts=False`` (the prompt as it is: Coconut's CoT / no-CoT formats)."""
        n = len(carries_markers)
        if not self.options.append_thoughts:
            return [None] * n
        k = self.options.num_thoughts
        if k is not None:
            return [k] * n
        if self.model.marker_ids[1] is None or all(carries_markers):
            return [None] * n
        k = default_thoughts(self.model) or None  # (read, and its warning given, only where a prompt needs it)
        return [None if carries else k for carries in carries_markers]

    def prepare_text(self, texts: list[str]) -> list[str]:
        """End each text that markers will be appended to in a newline (``thought_prompt``'s format, Coconut's
        ``question + "\n"``); a text that ends in one already keeps it alone."""
        start = self.model.marker_ids[0]
        marker = self.model.tokenizer.id_to_token(start) if start is not None else None
        appended = self._thoughts_to_append([marker is not None and marker in t for t in texts])
        return [t if k is None or t.endswith("\n") else t + "\n" for t, k in zip(texts, appended)]

    def prepare_prompt(self, batch: Batch) -> Batch:
        """Append each prompt's thoughts (``_thoughts_to_append``), left-padded again where the prompts get
        different counts; the markers' structure is checked here, before any work (a served request's bad
        markers are its 400, not a failure in the engine's step)."""
        start, latent, end = self.model.marker_ids
        carries = ((batch.ids == start) & batch.mask).any(1).tolist() if start is not None else []
        appended = self._thoughts_to_append(carries or [False] * batch.ids.shape[0])
        if len(set(appended)) == 1 and appended[0] is not None:  # the same thoughts after every prompt
            B, k = batch.ids.shape[0], appended[0]
            extra = torch.tensor([start] + [latent] * k + [end], device=batch.ids.device).expand(B, -1)
            ids = torch.cat([batch.ids, extra], dim=1)
            mask = torch.cat([batch.mask, torch.ones_like(extra, dtype=torch.bool)], dim=1)
            batch = Batch(ids, mask, batch.single)
        elif any(k is not None for k in appended):
            rows = [
                ids[real].tolist() + ([] if k is None else [start] + [latent] * k + [end])
                for ids, real, k in zip(batch.ids.cpu(), batch.mask.cpu(), appended)
            ]
            batch = left_padded(rows, batch.single, batch.ids.device)
        self.model.check_markers(batch.ids, batch.mask)
        return batch

    def prefill(self, batch: Batch) -> TokenOutput:
        model, backend = self.model, self.backend
        logits, inputs, _ = model.run_prompt(
            batch.ids,
            batch.mask,
            self.cache,
            self.hooks,
            feedback=backend.feedback,
            columns=partial(backend.column_runner, self.cache),
        )
        logits = logits[:, -1]
        if self.options.published_recompute:
            self._sequences = [inputs[b][real] for b, real in enumerate(batch.mask)]
        alive = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)
        return self._output(logits, alive)

    def next_token(self, tokens: Tensor, alive: Tensor, rows: list[bool]) -> TokenOutput:
        model, cache = self.model, self.cache
        embeds = model.embed(tokens[:, None])
        if self._sequences is not None:
            return self._output(self._recomputed(embeds, rows), alive)
        runner = self._answer_runner()
        if runner is None:
            chunk = cache.begin(alive[:, None])
            logits = model.lm_logits(model.forward_embeds(embeds, cache, chunk))[:, -1]
        else:
            runner.prepare(embeds, alive)
            logits = runner()
        return self._output(logits, alive)

    def _recomputed(self, embeds: Tensor, rows: list[bool]) -> Tensor:
        """``published_recompute``: the next logits [B, V] of each running row (``rows``; the others 0), its
        sequence of input embeddings with the new token's (``embeds`` [B,1,d]) run whole, from scratch, alone
        (``pass_whole``: Coconut's generate, batch 1, computes each answer token after the first so,
        and the cached pass rounds otherwise: in bf16 a token differs in a few answers of a hundred)."""
        out = torch.zeros(len(rows), self.model.config.vocab_size, device=embeds.device)
        for b, running in enumerate(rows):
            if running:
                self._sequences[b] = torch.cat([self._sequences[b], embeds[b]], 0)
                # the head over every position, as the published pass (a product's rows round with its row count)
                out[b] = self.model.lm_logits(self.model.pass_whole(self._sequences[b][None]))[0, -1]
        return out

    def _answer_runner(self):
        """The backend's answer-token runner (static buffers: one CUDA graph serves every token), made once;
        None where the backend has none or hooks are set."""
        if self._answer is None:
            self._answer = (None if self.hooks else self.backend.answer_runner(self.cache),)
        return self._answer[0]

    def _output(self, logits: Tensor, alive: Tensor) -> TokenOutput:
        iterations = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return TokenOutput(logits, iterations, nonfinite_flags(None, None, logits, alive))

    EVAL_MODES = PROMPT_MODES

    @classmethod
    def eval_mode(cls, model) -> str:
        """The trained format (training.json); a model without latent markers and without that file (a plain
        GPT-2, a published CoT / no-CoT run's checkpoint) is asked the question alone: ``cot``."""
        mode, info = trained_mode(model)
        return "cot" if mode in THOUGHT_MODES and model.marker_ids[1] is None and "mode" not in info else mode

    @classmethod
    def eval_prompt(cls, model, question: str, mode: str, thoughts: int | None = None) -> list[int]:
        """``mode`` coconut / pause: the question then the thoughts (``thoughts``, default the trained count;
        a model without latent markers is an InputError naming them); cot / nocot / nothoughts: the question
        alone."""
        if mode not in THOUGHT_MODES:
            return thought_prompt(model.tokenizer, question, None)
        k = default_thoughts(model) if thoughts is None else thoughts
        return thought_prompt(model.tokenizer, question, k, model.marker_ids)

    @classmethod
    def eval_options(cls, mode: str) -> dict:
        """cot / nocot / nothoughts ask the question alone, no markers (as Coconut's data has them): generate()
        would append the trained count to a prompt without markers. coconut answers as run.py's evaluation
        generates it, through the Coconut module's generate (``published_eos``: its first token never ends the
        answer, the eos that ends it is left out); the question-alone formats run HF's generate there, as
        latentrt's default does."""
        if mode == "coconut":
            return {"published_eos": True}
        return {} if mode in THOUGHT_MODES else {"append_thoughts": False}

    @classmethod
    def eval_max_new_tokens(cls, mode: str, source: str) -> int:
        """Coconut's run.py, in every format: 64 tokens on GSM8k data ('gsm' in the file's path, its test),
        128 on any other (ProsQA, ProntoQA)."""
        return 64 if "gsm" in source else 128

    @classmethod
    def report(cls, result) -> list[str]:
        return [f"continuous thoughts: {result.num_thoughts}"]
