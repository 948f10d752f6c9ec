"""The serving engine: requests come and go, their latent loops share launches at different depths.

``Engine.submit`` validates a request exactly as ``generate()`` would (the same ``Generation`` object and
messages) and queues it; ``Engine.step`` is one scheduler step:

1. admit queued requests into free pool rows (by the K/V their KV mode needs; FIFO, a long prompt only
   while the step's prompt budget allows), cancel the ones whose client went away;
2. begin the units of the tokens sampled last step (the scheduler's policy says when, below);
3. ``program.launch``: the family's program (latentrt/decode/serving.py) runs one piece of work per
   resident request: one core iteration at each row's own depth, or one Coconut pass;
4. the one device -> host read of the step: which units ended, and the tokens sampled last step;
5. host: tokens -> events, stop / length -> finish and free the row (a stop token ends a request one
   step after it is sampled: its next unit already began, and is dropped);
6. the logits of the units that ended (in this or earlier steps), sampled per request (its temperature,
   top-k/p and generator), when the scheduler says so (``_sample_due``): until then they wait. A request
   that asks for log-probabilities (``top_logprobs``) gets, with each token, the token's log-probability
   under the model's distribution (log-softmax of its logits over the vocabulary: before temperature and
   top-k/p, as OpenAI and vLLM report them) and the ``top_logprobs`` most likely tokens', read back with
   the tokens in the next step's one read. With ``echo`` it also gets the prompt's own tokens' (the
   decoder's ``prompt_logits``: one forward of the prompt, read back when the request is admitted).

Schedulers (``scheduler=``), for the same trace:
- ``depth`` (default): continuous batching at iteration granularity: a unit that ends is followed by the
  next one, a finished request's row is refilled; ended units wait (out of the launches) until the
  row-iterations lost by waiting reach the cost of the head and prelude passes sampling them costs
  (``edge_cost``), so those passes run for many rows at once;
- ``token``: continuous batching at token granularity (vLLM's policy): every resident request runs its
  token's loop in step with the others, rows that exited wait masked until the slowest exits (then all
  are sampled together), and new requests join between tokens;
- ``static``: a batch is admitted when the previous one has finished entirely (generate()'s policy).

Asynchronous scheduling (``async_scheduling=True``, as vLLM's): a step queues its launch first and then
reads the previous launch's flags and tokens (its read was started when that launch was queued), so the
host's work of a step (reading, sampling, beginning units, preparing the next launch) runs while the device
runs the launch, instead of between launches; the units that ended are sampled at the start of the step,
before the launch their next units join. The price: an exit is seen one step later (a row that exited runs
the next launch masked; the token schedulers' round ends one launch later), so the next unit of a request
begins a step later, and a request that stops on a token frees its row a step later (one that reaches
``max_new_tokens`` frees it when that token is sampled, in either mode). A loop at its r_max is known to end
on the host (``ended_on_host``): it is sampled before the next launch, at no price, as is every Coconut unit
(a pass always completes). Results are the same (a masked row changes nothing).

The engine runs on one thread (``run_forever`` or ``step`` in a loop; steps called from several threads,
as concurrent ``Engine.generate`` calls make them, take turns); ``submit`` and ``cancel`` may be called from
any thread. Each request receives ``RequestEvent``s through its ``on_event`` callback.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..decode.serving import Ended
from ..distributions import Distributions
from ..engine import Generation, GenerationResult
from ..errors import InputError, LatentRTError, NonFiniteStateError, PromptError, check_int, is_choice
from ..families import Family, check_applicable, family_for
from ..logprobs import MAX_TOP_LOGPROBS, TokenLogprob, logprob_rows, read_logprob_row
from ..lora_serving import read_for, using
from ..models.base import LatentModel
from ..options import GenerateOptions
from ..sequence_text import SequenceText, separator
from ..stop_strings import StopStrings
from ..transfer import to_device
from .metrics import EngineMetrics
from .offline import chat_all, generate_all
from .readback import Readback

log = logging.getLogger("latentrt.serve")

SCHEDULERS = ("depth", "token", "static")
POLICIES = ("fcfs", "priority")  # which queued request a free row takes (vLLM's --scheduling-policy)
# the most latent iterations per token a request may ask for, unless the engine is told (``max_num_steps``): 8x
# Huginn-0125's default depth (32)
DEFAULT_MAX_NUM_STEPS = 256
NOT_SERVER_DEFAULTS = (
    *("hooks", "logits_processors", "return_logits", "decoding", "decoding_options", "strict"),
    "logprobs",  # (a request's own field)
)


def server_defaults(model: LatentModel, override: dict) -> dict:
    """The generate() defaults a server gives every request (``latentrt serve --override-generation-config``):
    the model's (its generation_config.json) with ``override``'s options on top; any generate() option the
    server takes, checked now (names, values, the model's family) with generate()'s messages."""
    family = family_for(model)
    merged = checked_defaults(family, model.generation_defaults, override)
    family.decoder.check_options(model, GenerateOptions.build(None, **merged))  # (the checks needing the model)
    return merged


def checked_defaults(family: Family, defaults: dict, override: dict) -> dict:
    """``defaults`` (a model's generation_config.json) with ``override`` on top, checked as far as the family
    tells without the model: ``server_defaults`` less the decoder's own checks, for a launcher whose servers
    load the model elsewhere (latentrt/serve/ray.py)."""
    bad = sorted(set(override) & set(NOT_SERVER_DEFAULTS))
    if bad:
        raise InputError(
            f"{bad} cannot be server defaults (the server runs sequential decoding, without hooks or callables)"
        )
    merged = {**defaults, **override}
    options = GenerateOptions.build(None, **merged)
    options.validate()
    check_applicable(family, options)
    only = generate_only(family.decoder, options)
    if only:
        raise InputError(f"{only} cannot be server defaults: they run in generate() only")
    return merged


def generate_only(decoder, options: GenerateOptions) -> list[str]:
    """The options set in ``options`` that the family's decoder runs in generate() only (``GENERATE_ONLY``)."""
    return [name for name in sorted(decoder.GENERATE_ONLY) if options.is_set(name)]


class QueueFull(LatentRTError):
    """The engine's queue is full: try again later (HTTP 429)."""


class ShuttingDown(LatentRTError):
    """The engine is draining for shutdown and takes no new request (HTTP 503)."""


@dataclass
class RequestEvent:
    """One thing that happened to a request: ``token`` (a new token: id, its latent iterations, the text
    it adds, its log-probs if the request asked), ``text`` (text held back while it might have begun a stop
    string, shown when a stop token ends the request), then ``done`` (``request.finish_reason`` set) or
    ``error`` (``request.error`` set)."""

    kind: str
    token: int | None = None
    steps: int | None = None
    text: str | None = None
    logprob: TokenLogprob | None = None


@dataclass
class Sampled:
    """The tokens sampled in a step, on the device until the next step's one read: the requests, their
    token ids and non-finite flags [n], and for those of them that asked for log-probs (``lp_reqs``, in
    order) rows [token's log-prob, the k best log-probs, their ids] flattened (``logprobs``, fp32);
    ``entries``: each request's pool entries when its token was sampled (all of ended units: checked once
    the token reads back finite)."""

    reqs: list
    tokens: torch.Tensor
    flags: torch.Tensor
    entries: list[int]
    lp_reqs: list = field(default_factory=list)
    k: int = 0
    logprobs: torch.Tensor | None = None

    def parts(self) -> list[torch.Tensor]:
        """The tensors the step reads, on the device that computed them."""
        return [self.tokens, self.flags] + ([self.logprobs] if self.logprobs is not None else [])

    def read(self, host: list[float]) -> tuple[list[int], list[int], dict]:
        """This record's values from the step's read: token ids, flags, and per request that asked,
        (log-prob, [(id, log-prob)] of its own top_logprobs best)."""
        n, k = len(self.reqs), self.k
        tokens, flags, rest = [int(v) for v in host[:n]], [int(v) for v in host[n : 2 * n]], host[2 * n :]
        width = 1 + 2 * k
        lps = {
            id(req): read_logprob_row(rest[j * width : (j + 1) * width], req.top_logprobs)
            for j, req in enumerate(self.lp_reqs)
        }
        return tokens, flags, lps


@dataclass
class _Read:
    """A step's read on its way (``Readback``): the launch's flags (the first ``flags`` values), then the
    tokens of ``sampled``."""

    readback: Readback
    flags: int
    sampled: Sampled | None
    step: int  # the engine's step that launched it

    def values(self) -> list[float]:
        return self.readback.values()


@dataclass
class Request:
    """A resident or queued request and what it has produced so far."""

    id: str
    generation: Generation
    on_event: Callable[[RequestEvent], None] | None = None
    prompt_tokens: int = 0
    prompt_ids: list[int] = field(default_factory=list)  # host copy, read at submit (not inside a step)
    tokens: list[int] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    text: str = ""  # the final text, set when it finishes
    top_logprobs: int | None = None  # None: no log-probs; else the most likely tokens reported per position
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per token in ``tokens`` (when asked)
    echo: bool = False  # the response repeats the prompt (and with log-probs, scores its tokens)
    prompt_text: str = ""  # the prompt as text (decoded where it came as ids)
    echo_separator: str = ""  # echo: what the tokenizer puts between the prompt's text and the completion's
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # echo with log-probs: per prompt token
    live_text: bool = True  # decoded as it grows (a stream, stop strings, log-prob offsets); else at the end
    score_only: bool = False  # echo with no new token: the prompt is scored (with log-probs) and it ends
    priority: int = 0  # its place in the queue under the "priority" policy: lower first
    adapter: str | None = None  # the served LoRA adapter it runs with (None: the base model)
    adapter_slot: int | None = None  # that adapter's slot in the model's AdapterBank (None: the model has none)
    finish_reason: str | None = None  # "stop" / "length" / "cancelled" / "error"
    error: Exception | None = None
    stop_set: frozenset = frozenset()  # token ids that end it
    row: int | None = None
    latent_work: int = 0  # latent iterations (recurrent) or thoughts (Coconut) spent
    prefill_steps: list[int] | None = None  # adaptive_prefill: each prompt position's latent iterations
    stop_token_left_out: bool = False  # it ended on a stop token its output leaves out (Coconut's published eos)
    checked_entries: int = 0  # its pool row's first entries known finite (those of units whose token read finite)
    # scheduler state
    in_unit: bool = False  # a unit of this request is running in the program (or waits for its logits)
    exited: bool = False  # its unit ended and waits for the step that samples ended units
    sampled: int = 0  # tokens sampled, read back or not
    next_token: torch.Tensor | None = None  # sampled, its unit not begun yet (0-d, on the device)
    pending_steps: int = 0  # latent iterations of the unit that produced the token being read back
    cancelled: bool = False
    done: threading.Event = field(default_factory=threading.Event)
    times: dict = field(default_factory=dict)  # submitted / admitted / tokens (list) / finished

    @property
    def decoder(self):
        return self.generation.decoder

    @property
    def sequence_text(self) -> SequenceText | None:
        """The text as it grows (the Generation's one sequence; None without a tokenizer)."""
        texts = self.generation.texts
        return None if texts is None else texts[0]

    @property
    def batch(self):
        return self.generation.batch

    @property
    def options(self) -> GenerateOptions:
        return self.generation.options

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def emit(self, event: RequestEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)


class Engine:
    """A model served to many requests (see module docstring).

    ``max_batch`` requests are resident at most, each of up to ``max_len`` positions (prompt, thoughts and
    new tokens; default the model's context, at most 2048); ``kv_slots`` looped-layer K/V slots are shared by
    the resident requests' KV modes (default: every row in ``full`` mode at the model's default depth);
    ``max_queue`` requests wait at most; ``prefill_budget`` prompt positions enter one step at most (a
    longer prompt enters alone); ``edge_cost``: see ``_sample_due`` (None: the program's estimate);
    ``async_scheduling``: each step launches before reading the previous launch's flags (see module docstring);
    ``max_num_steps``: the most latent iterations per token a request may ask for (``num_steps``; default 256, or
    the model's default depth if larger): a request's cost per token, bounded as ``max_len`` bounds its tokens;
    ``scheduling_policy``: which queued request a free row takes: "fcfs" the first come, "priority" the one of
    lowest ``priority`` (a request's own, default 0), the first come among equals (vLLM's policies; a resident
    request is never preempted)."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 16,
        max_queue: int = 256,
        max_len: int | None = None,
        kv_slots: int | None = None,
        scheduler: str = "depth",
        prefill_budget: int = 2048,
        edge_cost: float | None = None,
        async_scheduling: bool = False,
        max_num_steps: int | None = None,
        scheduling_policy: str = "fcfs",
    ) -> None:
        family = family_for(model)
        if family.serving is None:
            raise InputError(f"{family.title} models cannot be served yet (their family has no serving program)")
        if scheduler not in SCHEDULERS:
            raise InputError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        if not is_choice(scheduling_policy, POLICIES):
            raise InputError(f"scheduling_policy must be one of {list(POLICIES)}, got {scheduling_policy!r}")
        self.scheduling_policy = scheduling_policy
        for name, value in (("max_batch", max_batch), ("max_queue", max_queue), ("prefill_budget", prefill_budget)):
            check_int(name, value, 1)
        # a request's latent iterations per token are its cost per token: bounded, as max_len bounds its tokens
        # (a request's default depth: the server's defaults', else the model's)
        default = model.generation_defaults.get("num_steps") or model.default_steps()
        self.max_num_steps = max(DEFAULT_MAX_NUM_STEPS, default) if max_num_steps is None else max_num_steps
        ok = isinstance(self.max_num_steps, int) and not isinstance(self.max_num_steps, bool)
        if not ok or self.max_num_steps < default:
            raise InputError(
                f"max_num_steps must be an integer >= {default} (the num_steps a request gets by default), got "
                f"{max_num_steps!r}"
            )
        block = model.config.block_size
        max_len = min(block, 2048) if max_len is None else max_len
        # at least a prompt token and a new one: a pool of shorter rows could serve no request
        check_int("max_len", max_len, 2, block, high_label=f"{block} (the model's context)")
        looped = model.cache_layout().looped
        kv_slots = max_batch * model.default_steps() if kv_slots is None else kv_slots
        if looped:
            check_int("kv_slots", kv_slots, 1)
        self.model, self.scheduler = model, scheduler
        self.max_batch, self.max_queue, self.max_len, self.prefill_budget = (
            max_batch,
            max_queue,
            max_len,
            prefill_budget,
        )
        model.reserve_positions(max_len)  # tables sized once: nothing grows while serving
        self.program = family.serving(model, max_batch, max_len, kv_slots if looped else 0)
        self._bind_adapters()
        self.queue: deque[Request] = deque()
        self.resident: list[Request] = []
        self.metrics = EngineMetrics()
        self.distributions = Distributions(model)  # sampled tokens' distributions, a captured graph per settings
        number = isinstance(edge_cost, int | float) and not isinstance(edge_cost, bool)
        if edge_cost is not None and not (number and 0 <= edge_cost < float("inf")):
            raise InputError(f"edge_cost must be a number >= 0, got {edge_cost!r}")
        self.edge_cost = edge_cost
        if not isinstance(async_scheduling, bool):
            raise InputError(f"async_scheduling must be true or false, got {async_scheduling!r}")
        if async_scheduling and not self.program.async_scheduling:
            raise InputError(
                f"{family.title} models cannot be served with async_scheduling (their program reads each step's "
                "end at once)"
            )
        self.async_scheduling = async_scheduling
        self._exited: list[tuple[Ended, int]] = []  # units that ended, not sampled yet, and the step they ended
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.draining = False
        self._stopped = False
        self._sampled: Sampled | None = None  # the tokens sampled in the last step (device)
        self._read: _Read | None = None  # asynchronous scheduling: the last launch's read, on its way to the host
        self._ids = 0
        self.looping = False  # run_forever is stepping the engine (on some thread)
        self._stepping = threading.Lock()  # one step at a time, whichever thread steps

    # ---------------------------------------------------------------- requests in
    def submit(
        self,
        prompt,
        options: GenerateOptions | None = None,
        *,
        on_event: Callable[[RequestEvent], None] | None = None,
        request_id: str | None = None,
        top_logprobs: int | None = None,
        echo: bool = False,
        text_per_token: bool = True,
        score_only: bool = False,
        priority: int = 0,
        adapter: str | None = None,
        **kwargs,
    ) -> Request:
        """Validate and queue a request (errors: InputError with generate()'s message, QueueFull, ShuttingDown);
        ``priority``: its place in the queue under the "priority" scheduling policy (lower first; any other value
        than 0 is an error under "fcfs", as in vLLM). ``prompt``: one prompt (text, ids); ``top_logprobs``: report
        each token's log-probability and those of the ``top_logprobs`` most likely tokens (None: no log-probs);
        ``echo``: the prompt too (its text, and with log-probs its tokens', where the family scores prompts);
        ``text_per_token``: False when nobody reads the text before the request finishes (a response that is not
        streamed): it is then decoded once, at the end, unless stop strings or log-probs' text offsets need it at
        every token (no per-token decoding work for the rest); ``score_only`` (with ``echo``: OpenAI's ``max_tokens:
        0``): no token is generated, the request ends once its prompt is scored (``max_new_tokens`` is then only
        checked); ``adapter``: the name of one of the LoRA adapters the model serves (latentrt/lora_serving.py;
        None: the base model)."""
        req = self.request(
            prompt,
            options,
            on_event=on_event,
            top_logprobs=top_logprobs,
            echo=echo,
            text_per_token=text_per_token,
            score_only=score_only,
            priority=priority,
            adapter=adapter,
            **kwargs,
        )
        self.enqueue(req, request_id)
        return req

    def request(
        self,
        prompt,
        options: GenerateOptions | None = None,
        *,
        on_event: Callable[[RequestEvent], None] | None = None,
        top_logprobs: int | None = None,
        echo: bool = False,
        text_per_token: bool = True,
        score_only: bool = False,
        priority: int = 0,
        adapter: str | None = None,
        **kwargs,
    ) -> Request:
        """``submit``'s validation: the Request it would queue (not queued; ``enqueue`` queues it)."""
        check_int("priority", priority, -(2**63), 2**63 - 1, high_label="2**63 - 1")  # (an int64, as vLLM's)
        bank = getattr(self.model, "adapter_bank", None)
        if adapter is not None and bank is None:
            raise InputError(f"adapter={adapter!r}: this model serves no LoRA adapters (--enable-lora --lora-modules)")
        adapter_slot = None if bank is None else bank.slot(adapter)
        if priority != 0 and self.scheduling_policy != "priority":
            raise InputError(
                f"priority={priority} is read under the priority scheduling policy (--scheduling-policy priority); "
                "this server takes requests first come, first served"
            )
        opts = GenerateOptions.build(options, self.model.generation_defaults, **kwargs)
        if top_logprobs is not None and opts.logprobs is not None and top_logprobs != opts.logprobs:
            raise InputError(f"top_logprobs={top_logprobs} and logprobs={opts.logprobs} disagree: give one")
        if top_logprobs is None:  # (the option's name in generate(); the server's field sets top_logprobs)
            top_logprobs = opts.logprobs
        if top_logprobs is not None:
            check_int("top_logprobs", top_logprobs, 0, MAX_TOP_LOGPROBS)
        if opts.hooks:
            raise InputError("hooks cannot be used with the server (they run Python between iterations)")
        if opts.return_logits:
            raise InputError("return_logits is not available from the server")
        gen = Generation(self.model, prompt, opts)
        if gen.decoder.sampler is not None:
            raise InputError(f"decoding={opts.decoding!r} runs in generate() only; the server decodes sequentially")
        for name in generate_only(gen.decoder, opts):
            raise InputError(f"{name}={getattr(opts, name)!r} runs in generate() only, not in the server")
        if gen.decoder.max_steps > self.max_num_steps:
            raise InputError(
                f"num_steps={gen.decoder.max_steps} is above this server's limit of {self.max_num_steps} latent "
                "iterations per token (its max_num_steps)"
            )
        if score_only and not echo:
            raise InputError("only a request that echoes its prompt can generate no token (max_tokens 0)")
        if echo and top_logprobs is not None and not gen.decoder.SCORES_PROMPTS:
            raise InputError(f"echo with logprobs scores the prompt's tokens, which {gen.decoder.TITLE} models do not")
        if not gen.batch.single:
            raise InputError("a request takes one prompt (send several requests for a batch)")
        need = gen.batch.ids.shape[1] + opts.max_new_tokens
        with self.lock:  # (not while ``_reset`` replaces the program)
            why = self.program.pool.never_fits(need, self.program.kv_mode(gen.decoder))
        if why is not None:
            raise PromptError(why)
        req = Request("", gen, on_event, prompt_tokens=int(gen.batch.mask.sum()))
        req.stop_set, req.prompt_ids = frozenset(gen.stop_ids.tolist()), gen.batch.ids[0].tolist()
        req.top_logprobs, req.echo = top_logprobs, bool(echo)
        req.prompt_text = prompt if isinstance(prompt, str) else gen._decode(req.prompt_ids) or ""
        req.live_text = bool(text_per_token) or bool(gen.stop_strings) or top_logprobs is not None
        req.score_only = bool(score_only)
        req.priority = priority
        req.adapter, req.adapter_slot = adapter, adapter_slot
        return req

    def enqueue(self, req: Request, request_id: str | None = None, *, beyond_max_queue: bool = False) -> None:
        """Queue a ``request`` (QueueFull past ``max_queue`` unless ``beyond_max_queue``: a caller that is
        its own queue, as ``generate``; ShuttingDown once draining)."""
        with self.lock:
            if self.draining:
                raise ShuttingDown("the server is shutting down")
            bank = self.model.adapter_bank
            if req.adapter is not None and bank.names.get(req.adapter) != req.adapter_slot:  # (unloaded meanwhile)
                raise InputError(f"no LoRA adapter {req.adapter!r} is served here (it was unloaded)")
            if len(self.queue) >= self.max_queue and not beyond_max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._ids += 1
            req.id = request_id or f"req-{self._ids}"
            req.times["submitted"] = time.perf_counter()
            req.times["tokens"] = []
            if self.scheduling_policy == "priority":  # (before the first that comes after it: FIFO among equals)
                at = next((i for i, q in enumerate(self.queue) if q.priority > req.priority), len(self.queue))
                self.queue.insert(at, req)
            else:
                self.queue.append(req)
            self.wake.notify()

    def cancel(self, req: Request) -> None:
        """The client went away: the request ends at the next step and frees its row."""
        with self.lock:
            req.cancelled = True
            self.wake.notify()

    # ---------------------------------------------------------------- the loop
    @property
    def busy(self) -> bool:
        pending = self._read is not None and (self._read.flags or self._read.sampled is not None)
        return bool(self.queue or self.resident or self._sampled or self._exited or pending)

    def run_until_idle(self) -> None:
        while self.busy:
            self.step()

    def run_forever(self) -> None:
        """Step while there is work, sleep while there is none, return after ``stop`` (once drained)."""
        self.looping = True
        try:
            while True:
                with self.lock:
                    while not self.busy and not self._stopped:
                        self.wake.wait()
                    if self._stopped and not self.busy:
                        return
                self.step()
        finally:
            self.looping = False

    def generate(self, prompts, options=None, **kwargs) -> list[GenerationResult]:
        """vLLM's offline ``LLM.generate``: every prompt a request with its own options (one
        ``GenerateOptions`` for all, or a list with one per prompt; keywords replace fields of each), served by
        continuous batching; one single-prompt ``GenerationResult`` per prompt, in order, each equal to
        ``latentrt.generate(model, prompt, options)`` alone. Every prompt is validated before any runs (an
        error names its index). ``priority=``: one for every prompt or one per prompt (vLLM's keyword; read under
        the "priority" scheduling policy). ``adapter=``: a served LoRA adapter's name, one for every prompt or one per
        prompt (vLLM's ``lora_request``). Steps the engine itself, or waits while ``run_forever`` runs it on
        another thread (latentrt/serve/offline.py)."""
        return generate_all(self, prompts, options, **kwargs)

    def chat(self, conversations, options=None, **kwargs) -> list[GenerationResult]:
        """vLLM's offline ``LLM.chat``: each conversation (OpenAI-style messages; one, or a list of them) through
        the model's chat template (``template=``, ``add_generation_prompt=``, ``continue_final_message=``,
        ``chat_template_kwargs=``, ``tools=``: as ``apply_chat_template`` takes them), then ``generate``
        (latentrt/serve/offline.py)."""
        return chat_all(self, conversations, options, **kwargs)

    def stop(self) -> None:
        """Stop taking requests; ``run_forever`` returns once the queued and resident ones are done."""
        with self.lock:
            self.draining = self._stopped = True
            self.wake.notify()

    def step(self) -> None:
        """One scheduler step (see module docstring); callers on several threads take turns."""
        with self._stepping:
            self._step()

    @torch.no_grad()
    def _step(self) -> None:
        t0 = time.perf_counter()
        self._drop_cancelled()
        t_sample = time.perf_counter()
        if self.async_scheduling:  # sampled before the launch they join (see ``_sample_ended``)
            try:
                for e in self.program.ended_on_host():  # (they ended in the last launch: at their r_max)
                    self._mark_exited(e, self.metrics.steps - 1)
                self._sample_ended(joins=self.metrics.steps)
            except Exception as exc:
                self._reset(exc)
                return
        sampling = time.perf_counter() - t_sample
        admitted = self._admit()
        t_program = time.perf_counter()
        for req in admitted:
            try:
                if req.echo and req.top_logprobs is not None:
                    req.prompt_logprobs = self._score_prompt(req)
                self.program.admit(req)
                req.in_unit = True
            except LatentRTError as exc:
                self._fail(req, exc)
        self._start_units()
        # the program's work (begin units) and sampling: computation, not scheduling
        program = time.perf_counter() - t_program + sampling
        idle = [r for r in self.resident if not r.in_unit or r.exited] if self.scheduler != "depth" else []
        try:
            t1 = time.perf_counter()
            flags = self.program.launch(idle)
            # the step's one device -> host read: which units ended, and the sampled tokens not read yet (the
            # program's work and sampling count as computation, the rest of the step as scheduling); with
            # asynchronous scheduling, those of the previous step, read while this step's launch runs
            if self.async_scheduling:
                read, self._read = self._read, None
            else:
                read = self._start_read(flags)
            host = read.values() if read is not None else []
            t2 = time.perf_counter()
            if read is not None:
                self._take_tokens(read.sampled, host[read.flags :])
            t3 = time.perf_counter()
            if read is not None:
                for e in self.program.ended([int(v) for v in host[: read.flags]]):
                    self._mark_exited(e, read.step)
            if self.async_scheduling:
                self._read = self._start_read(flags)
            else:
                self._sample_ended(joins=self.metrics.steps + 1)
            t4 = time.perf_counter()
        except Exception as exc:  # a fault no single request can be blamed for: fail the resident ones, go on
            self._reset(exc)
            return
        self.metrics.step(t4 - t0, program + (t2 - t1) + (t4 - t3), self.program.launched_rows, self)

    def _start_read(self, flags: torch.Tensor) -> _Read:
        """The read of a launch's flags and of the tokens sampled since the last read (started now, on its way
        while later work is queued). A launch that ran nothing has no flags to read: they are left out, or they
        would pull the sampled tokens to the host on their own."""
        parts = [flags] if flags.numel() else []
        parts += self._sampled.parts() if self._sampled is not None else []
        read = _Read(Readback(parts), flags.numel(), self._sampled, self.metrics.steps)
        self._sampled = None
        return read

    def load_adapter(self, name: str, path) -> None:
        """Serve one more LoRA adapter (vLLM's runtime loading): read, then written into a free slot of the
        model's bank between two steps (latentrt/lora_serving.py)."""
        bank = self._adapter_bank()
        adapter = read_for(self.model, path)  # (the files read outside the step)
        with self._stepping, self.lock:
            bank.add(name, adapter)

    def unload_adapter(self, name: str) -> None:
        """Stop serving a LoRA adapter, between two steps; refused while a queued or resident request uses it."""
        bank = self._adapter_bank()
        with self._stepping, self.lock:
            users = sum(r.adapter == name for r in (*self.queue, *self.resident))
            if users and name in bank.names:
                raise InputError(f"LoRA adapter {name!r} is in use by {users} request(s): unload it once they finish")
            bank.remove(name)

    def _adapter_bank(self):
        bank = self.model.adapter_bank
        if bank is None:
            raise InputError("this model serves no LoRA adapters (--enable-lora)")
        return bank

    def _bind_adapters(self) -> None:
        """Served LoRA adapters (latentrt/lora_serving.py): one slot per pool row, set when a request is admitted."""
        bank = getattr(self.model, "adapter_bank", None)
        if bank is not None:
            bank.bind_rows(self.program.pool.rows)

    def _reset(self, exc: Exception) -> None:
        """After an unexpected error inside a launch: every resident request fails with it and the program
        starts afresh (a new pool); queued requests are served as usual. The traceback goes to the
        ``latentrt.serve`` log (clients see the message only)."""
        running = list(self.resident) + (self._sampled.reqs if self._sampled is not None else [])
        running += self._read.sampled.reqs if self._read is not None and self._read.sampled is not None else []
        failing = list({id(r): r for r in running if not r.finished}.values())
        log.error("a scheduler step failed; %d running request(s) fail with it", len(failing), exc_info=exc)
        for req in failing:
            req.error = exc
            req.finish_reason = "error"
            req.times["finished"] = time.perf_counter()
            self.metrics.ended["error"] += 1
            req.emit(RequestEvent("error"))
            req.done.set()
        self.resident.clear()
        self._exited = []
        self._sampled = self._read = None
        cls, pool = type(self.program), self.program.pool
        with self.lock:  # (``request`` reads the program's pool on the caller's thread: it waits for the new one)
            self.program = None  # the old pool goes before the new one is allocated
            self.program = cls(self.model, pool.rows, pool.max_len, pool.slot_rows)
            self._bind_adapters()

    def _mark_exited(self, ended: Ended, step: int) -> None:
        """A unit that ended in the launch of engine step ``step``: it waits to be sampled."""
        ended.request.exited = True
        self._exited.append((ended, step))

    def _sample_ended(self, joins: int) -> None:
        """Sample the units that ended if the scheduler says so now (``_sample_due``); their next units join
        the launch of engine step ``joins`` (the next step's; with asynchronous scheduling, this step's: it
        samples before its launch, as its reads come after it)."""
        if self._sample_due(joins):
            ended, self._exited = [e for e, _ in self._exited if not e.request.finished], []
            self._sample(ended)

    def _sample_due(self, joins: int) -> bool:
        """Whether this step samples the units that ended (then the next begins their tokens' preludes
        together): ``token`` / ``static`` when no unit runs any more (the round's end); ``depth`` also as
        soon as the iterations lost by rows waiting since they ended, counting the step they would wait
        next, reach what the heads and preludes cost (renting until buying pays). A row's wait costs 1 / rows
        of a step, a step costs a core iteration (and a head where logit criteria checked in it), sampling
        costs ``edge_cost`` core iterations (default: the program's weight ratios). Waiting never changes a
        result; ``edge_cost=0`` samples every step."""
        if not self._exited:
            return False
        if not any(r.in_unit and not r.exited for r in self.resident):
            return True
        if self.scheduler != "depth":
            return False
        program = self.program
        cost = self.edge_cost
        if cost is None:
            heads = any(not e.ready for e, _ in self._exited)
            cost = program.prelude_cost + (program.head_cost if heads else 0.0)
        waited = sum(joins - step for _, step in self._exited)  # launches missed, the next one counted
        return waited * program.step_cost >= cost * len(self.resident)

    def _admit(self) -> list[Request]:
        """Queued requests into free rows, in the queue's order (the scheduling policy's), as the scheduler
        allows."""
        if self.scheduler == "static" and self.resident:
            return []
        if self.scheduler == "token" and any(r.in_unit for r in self.resident):
            return []
        admitted, budget, scored = [], self.prefill_budget, []
        pool = self.program.pool
        with self.lock:
            while self.queue:
                req = self.queue[0]
                if req.cancelled:
                    self.queue.popleft()
                    self._finish(req, "cancelled")
                    continue
                if req.score_only:  # no row: scored (below, outside the lock) and ended
                    self.queue.popleft()
                    scored.append(req)
                    continue
                mode = self.program.kv_mode(req.decoder)
                size = req.batch.ids.shape[1]
                if not pool.can_allocate(mode) or (admitted and size > budget):
                    break
                self.queue.popleft()
                req.row = pool.allocate(mode)
                if req.adapter_slot is not None:  # (its tokens' adapter in every pass over its row)
                    self.model.adapter_bank.row_slots[req.row] = req.adapter_slot
                req.times["admitted"] = time.perf_counter()
                budget -= size
                admitted.append(req)
                self.resident.append(req)
        for req in scored:
            try:
                if req.top_logprobs is not None:
                    req.prompt_logprobs = self._score_prompt(req)
            except LatentRTError as exc:
                self._fail(req, exc)
                continue
            self._finish(req, "length")
        return admitted

    def _start_units(self) -> None:
        """Begin the next units of requests whose last token is sampled (depth: at once; the others: when
        every resident request's unit has ended)."""
        if self.scheduler != "depth" and any(r.in_unit for r in self.resident):
            return
        for req in self.resident:
            if req.next_token is not None and req.sampled < req.options.max_new_tokens:
                self.program.start(req, req.next_token)
                req.in_unit = True
            req.next_token = None

    def _score_prompt(self, req: Request) -> list[TokenLogprob]:
        """The prompt's own tokens' log-probs (``echo``): one forward of the prompt (the decoder's
        ``prompt_logits``), read back here; the first token has none. Offsets: where the text each token
        adds starts (the length of the prompt's tokens before it, decoded), as for generated tokens."""
        ids, vocab = req.prompt_ids, self.model.config.vocab_size
        ids_t = torch.tensor(ids, device=self.model.device)
        with using(self.model, req.adapter):
            logits = req.decoder.prompt_logits(ids_t)
        rows = logprob_rows(logits[:-1], ids_t[1:], req.top_logprobs, vocab).tolist() if len(ids) > 1 else []
        offsets = [0] * len(ids)
        if self.model.tokenizer is not None:  # (decoded as it grows, as generated tokens' offsets are)
            prompt = SequenceText(self.model.tokenizer, StopStrings([]))
            for i, t in enumerate(ids):
                offsets[i] = min(len(prompt.text), len(req.prompt_text))
                prompt.add(t)
        out = [TokenLogprob(ids[0], None, [], 0)]
        for i, row in enumerate(rows):
            out.append(TokenLogprob(ids[i + 1], *read_logprob_row(row, req.top_logprobs), offsets[i + 1]))
        return out

    def _take_tokens(self, sampled: Sampled | None, host: list[float]) -> None:
        """Sampled tokens on the host (``sampled``: their record): record, stream, stop."""
        if sampled is None:
            return
        tokens, flags, lps = sampled.read(host)
        for req, tok, flag, entries in zip(sampled.reqs, tokens, flags, sampled.entries):
            if req.finished:
                continue
            if not flag:
                req.checked_entries = entries
            index = len(req.tokens)
            if flag:
                try:
                    req.generation._raise_if_nonfinite([flag], index)
                except (NonFiniteStateError, InputError) as exc:  # (InputError: no token left to choose)
                    self._fail(req, exc)
                continue
            stopped = tok in req.stop_set and req.decoder.stops_at(index)
            kept = req.decoder.keep_stop_token or not stopped
            req.stop_token_left_out = not kept
            lp = None
            if kept:
                if id(req) in lps:
                    lp = TokenLogprob(tok, *lps[id(req)], offset=req.sequence_text.shown if req.sequence_text else 0)
                    req.logprobs.append(lp)
                req.tokens.append(tok)
                req.steps.append(req.pending_steps)
                req.times["tokens"].append(time.perf_counter())
            cut, delta, text = None, None, req.sequence_text
            if req.live_text and text is not None:  # as generate() shows it (latentrt/sequence_text.py)
                if kept:
                    text.add(tok, may_stop=index + 1 >= req.options.min_new_tokens)
                cut = text.cut
                ends = stopped or cut is not None or index + 1 >= req.options.max_new_tokens
                delta = text.end(req.tokens) if ends else text.show()
            if kept:
                req.emit(RequestEvent("token", tok, req.pending_steps, delta, lp))
            elif delta:  # a stop token ends it: the text it held back
                req.emit(RequestEvent("text", text=delta))
            self.metrics.tokens += 1
            if stopped or cut is not None:
                self._finish(req, "stop")
            elif index + 1 >= req.options.max_new_tokens:
                self._finish(req, "length")

    def _sample(self, ended: list) -> None:
        """Sample the next token of every unit that ended, each with its request's own settings."""
        if not ended:
            return
        logits, flags = self.program.logits(ended)
        # greedy rows together; a request with penalties or a bias, or one that samples, on its own: its
        # distribution on its row alone, as generate() computes it (latentrt/distributions.py: a graph per settings)
        greedy = [
            i
            for i, e in enumerate(ended)
            if e.request.options.temperature == 0 and not e.request.generation._adjusts_logits(e.request.sampled)
        ]
        vocab = self.model.config.vocab_size
        if len(greedy) == len(ended):  # (the usual case: one argmax, no gather and scatter of the rows)
            tokens = logits[:, :vocab].argmax(-1)
        else:
            tokens = torch.empty(len(ended), dtype=torch.long, device=logits.device)
            if greedy:
                at = to_device(greedy, logits.device)
                tokens[at] = logits[at, :vocab].argmax(-1)
        if any(e.request.generation.constraints is not None for e in ended):
            flags = flags.long()  # (the programs' logits() return a new tensor: written in place below)
        failed = []
        for i, e in enumerate(ended):
            req = e.request
            req.in_unit = req.exited = False
            req.sampled += 1
            req.pending_steps = e.iterations
            req.latent_work += e.iterations
            self.metrics.iterations += e.iterations
            self.metrics.needed += e.needed
            gen, index = req.generation, req.sampled - 1
            try:
                if req.options.temperature != 0:  # (the distribution through its settings' graph, then the draw)
                    adjusted = gen._adjusts_logits(index)
                    row = gen._next_logits(logits[i : i + 1], index) if adjusted else logits[i : i + 1]
                    tokens[i] = gen.draw_from(self.distributions(gen.sampling_settings, row))[0]
                elif gen._adjusts_logits(index):
                    tokens[i] = gen._pick(gen._next_logits(logits[i : i + 1], index))[0]
            except Exception as exc:  # (a request's own logits processor raised: it fails alone, below)
                failed.append((req, exc))
                tokens[i] = 0
                continue
            gen._record(tokens[i : i + 1])
            if gen.constraints is not None:  # (a row left no token to choose: its flag fails it when read)
                flags[i : i + 1] = gen.flags(flags[i : i + 1])
            req.next_token = tokens[i]
        entries = [self.program.pool.lengths[e.request.row] for e in ended]
        self._sampled = Sampled([e.request for e in ended], tokens, flags.long(), entries)
        for e in ended:  # its last token: the row is needed no more, whatever the token reads back as
            if e.request.sampled >= e.request.options.max_new_tokens:
                self._release(e.request)
        for req, exc in failed:
            self._fail(req, exc)
        want = [i for i, e in enumerate(ended) if e.request.top_logprobs is not None]
        if want:  # the model's distribution (no temperature / top-k/p), over the vocabulary
            at = to_device(want, logits.device)
            k = min(max(ended[i].request.top_logprobs for i in want), vocab)
            self._sampled.lp_reqs, self._sampled.k = [ended[i].request for i in want], k
            self._sampled.logprobs = logprob_rows(logits[at], tokens[at], k, vocab).reshape(-1)

    # ---------------------------------------------------------------- requests out
    def _drop_cancelled(self) -> None:
        for req in [r for r in self.resident if r.cancelled and not r.finished]:
            self._finish(req, "cancelled")

    def _finish(self, req: Request, reason: str) -> None:
        if req.sequence_text is not None:
            req.text = req.sequence_text.finish(req.tokens)
            if req.echo and req.text:  # (the completion's text as it reads after the prompt's)
                req.echo_separator = separator(
                    self.model.tokenizer, req.prompt_ids, req.tokens, req.sequence_text.skip_special
                )
        req.finish_reason = reason
        req.times["finished"] = time.perf_counter()
        req.times["finished_step"] = self.metrics.steps
        self._release(req)
        self.metrics.ended[reason] += 1
        if reason in ("stop", "length"):
            self.metrics.finished(req)
        req.emit(RequestEvent("error" if reason == "error" else "done"))
        req.done.set()

    def _release(self, req: Request) -> None:
        """Give a resident request's row back (its prompt's latent work counted first)."""
        if req.row is not None and req in self.resident:
            work = self.program.latent_work(req)
            req.latent_work += work
            self.metrics.iterations += work  # (Coconut: its thoughts; /metrics' latent work per token)
            self.program.retire(req)
            self.resident.remove(req)

    def _fail(self, req: Request, exc: Exception) -> None:
        req.error = exc
        self._finish(req, "error")
