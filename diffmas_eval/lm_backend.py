"""lm-eval model backends: a thin adapter from lm-eval requests to batches for a method, and back.

One backend class per registered method (`methods/registry.py`), derived here: `backend_class("latent-mas")` is
`LatentMASLM`. All method logic lives in `diffmas_eval.methods`; decoding and scoring in `diffmas_eval.core`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from diffmas_eval import __version__
from diffmas_eval.core.backbone import resolve_device
from diffmas_eval.core.batch_invariant import is_batch_invariant
from diffmas_eval.core.decode import DecodingConfig, derive_seed, generate
from diffmas_eval.core.linear import cpu_kernels_label
from diffmas_eval.core.score import score_continuations
from diffmas_eval.methods import Method, Question
from diffmas_eval.methods.registry import get_method, methods
from diffmas_eval.paths import cache_dir
from diffmas_eval.prompts import FINAL_ROLE
from diffmas_eval.settings import BUDGET_KEYS, build_settings, setting, unknown_names_message

logger = logging.getLogger(__name__)


@dataclass
class BackendArgs:
    """Model args of every backend that are about running requests, not about the method."""

    device: str | None = setting("cuda, cuda:1, cpu, ... (default: CUDA if available); or lm-eval's --device.")
    batch_size: str | None = setting("Rows per batch (an integer; auto is refused); or lm-eval's --batch_size.", "1")
    max_batch_size: int | None = setting("Accepted for lm-eval compatibility; unused.")
    max_gen_toks: int = setting("Final agent's budget when the task gives none (tasks give one).", 512)
    seed: int = setting("Base seed; each request's seed derives from it and the request.", 1234)
    sidecar: str | None = setting("Path of the per-document JSONL (default: a unique file in the user cache).")
    max_length: int | None = setting("Context length for loglikelihood_rolling (default: the model's).")
    doc_offset: int = setting(
        "Added to lm-eval's doc_id in the side-car. lm-eval numbers the documents --samples selects from 0: with a "
        "contiguous range, give its first index, and the side-car records each document's index in the task.",
        0,
    )


def _store_key(*parts: Any) -> str:
    """Identity of one request within a run (what it asks, its answer format and seed)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def prompt_hash(context: str) -> str:
    """lm-eval's `prompt_hash` of a sample: sha256 hex of the context string."""
    return hashlib.sha256(context.encode("utf-8")).hexdigest()


def _parse_batch_size(batch_size: int | str | None) -> int:
    if batch_size is None:
        return 1
    text = str(batch_size)
    if text.startswith("auto"):
        raise ValueError("batch_size=auto is not supported by the diffmas-eval backends; give an integer, e.g. 8")
    value = int(text)
    if value < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
    return value


class MultiAgentLM(LM):
    """Base lm-eval backend. `backend_class(name)` derives the class of each registered method."""

    method_name: ClassVar[str]

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> MultiAgentLM:
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict[str, Any], additional_config: dict | None = None) -> MultiAgentLM:
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        twice = sorted(set(arg_dict) & set(extra))
        if twice:
            raise ValueError(f"{', '.join(twice)} given twice (in --model_args and as --{twice[0]}); give it once")
        return cls(**arg_dict, **extra)

    @classmethod
    def parse_model_args(cls, args: dict[str, Any]) -> tuple[BackendArgs, Any]:
        """Split and validate model args into (backend args, the method's config); raises before any model work."""
        method_class = get_method(cls.method_name)
        backend_names = {f.name for f in fields(BackendArgs)}
        method_names = {f.name for f in fields(method_class.config_class)}
        unknown = sorted(set(args) - backend_names - method_names)
        if unknown:
            known = sorted(backend_names | method_names)
            raise ValueError(
                f"--model {cls.method_name} does not take model arg(s) {unknown_names_message(unknown, known)}; "
                f"it takes: {', '.join(known)} (see `diffmas-eval models`)"
            )
        what = f"--model {cls.method_name} model arg(s)"
        backend = build_settings(BackendArgs, {k: v for k, v in args.items() if k in backend_names}, what=what)
        config = build_settings(
            method_class.config_class, {k: v for k, v in args.items() if k in method_names}, what=what
        )
        config.validate()
        _parse_batch_size(backend.batch_size)
        return backend, config

    def __init__(self, **model_args: Any) -> None:
        super().__init__()
        # Validate everything a user can get wrong before loading any weights.
        args, config = self.parse_model_args(model_args)
        self.batch_size = _parse_batch_size(args.batch_size)
        self.max_gen_toks = int(args.max_gen_toks)
        self.max_length = args.max_length
        self.seed = int(args.seed)
        self.doc_offset = int(args.doc_offset)
        self._init_distributed(args.device)
        self.method: Method = get_method(self.method_name).load(config, self._device)
        self.backbone = self.method.backbone
        self.prompt_set = self.method.prompts
        self.totals: Counter[str] = Counter()
        self._all_totals: Counter[str] | None = None  # summed over processes after each request type
        self._sidecars: list[str] | None = None
        self.sidecar_path = Path(args.sidecar) if args.sidecar else self._default_sidecar()
        if args.sidecar and self._world_size > 1:  # one file per process: appends from several could interleave
            self.sidecar_path = self.sidecar_path.with_name(f"{self.sidecar_path.stem}.rank{self._rank}.jsonl")
        self.sidecar_path.parent.mkdir(parents=True, exist_ok=True)
        self._run_key = self.run_key()
        self._load_sidecar()
        if self._finished:
            logger.info("reusing %d finished requests from %s", len(self._finished), self.sidecar_path)

    # --- distribution (data parallel through accelerate, as lm-eval's own HF backend) ---

    def _init_distributed(self, device: str | None) -> None:
        self.accelerator = None
        self._rank, self._world_size = 0, 1
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            from accelerate import Accelerator

            # Without CUDA, `cpu=True` makes accelerate set up a gloo group (MULTI_CPU) instead of ignoring WORLD_SIZE.
            self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
            self._device = self.accelerator.device
        else:
            self._device = resolve_device(device)

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.accelerator.gather(tensor) if self.accelerator else tensor

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if not self.accelerator:
            return [obj]
        gathered = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, gathered, dst=dst)
        return gathered

    def barrier(self) -> None:
        if self.accelerator:
            self.accelerator.wait_for_everyone()

    # --- templating is ours: refuse lm-eval's ---

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        raise ValueError(
            "the diffmas-eval backends template every agent's turn themselves; drop "
            "--apply_chat_template (and --system_instruction: use model arg system_prompt)"
        )

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.chat_template(True)

    # --- requests ---

    @staticmethod
    def _answer_format(request: Any, gen_kwargs: dict[str, Any] | None = None) -> str | None:
        if gen_kwargs and "answer_format" in gen_kwargs:
            return gen_kwargs["answer_format"]
        doc = getattr(request, "doc", None)
        return doc.get("answer_format") if isinstance(doc, dict) else None

    def _token_counts(self, contexts: list[str]) -> dict[str, int]:
        """Tokens per distinct context. Batches are formed longest first by tokens, not characters (as lm-eval's `hf`
        backend does): every agent's prompt repeats the context, so rows of one batch then pad to nearly the same
        trace length (`benchmarks/bench_memory.py` shows the pad fraction either way)."""
        return {context: len(self.backbone.encode(context)) for context in dict.fromkeys(contexts)}

    @staticmethod
    def _other_contexts(contexts: list[str]) -> dict[str, str]:
        """For the `other_doc` control: each distinct context maps to the next distinct one (cyclically)."""
        distinct = list(dict.fromkeys(contexts))
        if len(distinct) < 2 and distinct:
            raise ValueError("communication=other_doc needs at least two different documents")
        return {c: distinct[(i + 1) % len(distinct)] for i, c in enumerate(distinct)}

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Decode the final agent's answer for each request (batched by gen_kwargs, original order restored).

        Requests already finished in the side-car under the same run configuration are not recomputed.
        """
        others = self._other_contexts([r.args[0] for r in requests]) if self._needs_other_doc() else {}
        items = []
        occurrences: Counter[str] = Counter()
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            answer_format = self._answer_format(request, gen_kwargs)
            gen_kwargs.pop("answer_format", None)
            key = json.dumps([context, gen_kwargs], sort_keys=True, default=str)
            # Repeats of one request (lm-eval clones them) get different seeds; nothing depends on batch or order.
            occurrence = occurrences[key]
            seed = derive_seed(self.seed, key, occurrence)
            occurrences[key] += 1
            partner = others.get(context)
            store_key = _store_key("generate_until", context, gen_kwargs, answer_format, seed, partner)
            items.append((index, context, gen_kwargs, answer_format, seed, request, store_key, partner, occurrence))
        outputs: list[str | None] = [self._reuse(it[6]) for it in items]
        rebudgeted = []
        for position, item in enumerate(items):
            if outputs[position] is None and (record := self._reuse_other_budget(item)) is not None:
                outputs[position] = record["result"]
                rebudgeted.append(record)
        if rebudgeted:
            self._write(rebudgeted)
        todo = [it for it, out in zip(items, outputs, strict=True) if out is None]
        tokens = self._token_counts([it[1] for it in todo])
        collator = Collator(
            todo, sort_fn=lambda it: (-tokens[it[1]], it[0]), group_fn=lambda it: it[2], group_by="gen_kwargs"
        )
        bar = tqdm(total=len(todo), desc=f"{self.method_name} generate_until", disable=disable_tqdm or self._rank != 0)
        for batch in collator.get_batched(n=self.batch_size):
            decoding = DecodingConfig.from_gen_kwargs(batch[0][2], self.max_gen_toks)
            questions = [Question(it[1], it[3], it[4], it[7]) for it in batch]
            began = time.perf_counter()
            with torch.inference_mode():
                start = self.method.prepare(questions, decoding)
                trace_tokens = start.trace_tokens()
                with self.method.acting_as(FINAL_ROLE):
                    generations = generate(
                        self.method.final_backbone(start),
                        start.prompts,
                        start.trace,
                        decoding,
                        [q.seed for q in questions],
                        prompt_embeds=start.prompt_embeds,
                    )
            seconds = (time.perf_counter() - began) / len(batch)
            records = []
            for row, (item, gen) in enumerate(zip(batch, generations, strict=True)):
                final = {
                    "prompt_tokens": len(start.prompts[row]),
                    "generated_tokens": len(gen.token_ids),
                    "stopped_before_budget": gen.stopped_before_budget,
                    "budget": decoding.max_new_tokens,
                }
                records.append(
                    self._record(
                        item[5],
                        "generate_until",
                        start,
                        row,
                        final,
                        trace_tokens[row],
                        seconds,
                        item[4],
                        item[6],
                        gen.text,
                    )
                )
                outputs[item[0]] = gen.text
            self._write(records)
            bar.update(len(batch))
        bar.close()
        self._gather_totals()
        return outputs

    def _needs_other_doc(self) -> bool:
        return getattr(self.method.config, "communication", None) == "other_doc"

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Score each continuation as the start of the final agent's reply (leading whitespace removed).

        The upstream agents run once per distinct (context, answer format); all its continuations (2-5 for
        multiple choice) are scored against that one working memory.
        """
        groups: dict[tuple[str, str | None], list[int]] = {}
        for index, request in enumerate(requests):
            context, _ = request.args
            groups.setdefault((context, self._answer_format(request)), []).append(index)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        others = self._other_contexts([k[0] for k in groups]) if self._needs_other_doc() else {}
        store_keys = {
            key: _store_key("loglikelihood", key[0], [requests[i].args[1] for i in members], key[1], others.get(key[0]))
            for key, members in groups.items()
        }
        todo = []
        for key, members in groups.items():
            reused = self._reuse(store_keys[key])
            if reused is None:
                todo.append(key)
            else:
                for index, score in zip(members, reused, strict=True):
                    results[index] = tuple(score)
        tokens = self._token_counts([k[0] for k in todo])
        todo.sort(key=lambda k: -tokens[k[0]])
        decoding = DecodingConfig(max_new_tokens=self.max_gen_toks)
        bar = tqdm(
            total=sum(len(groups[k]) for k in todo),
            desc=f"{self.method_name} loglikelihood",
            disable=disable_tqdm or self._rank != 0,
        )
        for begin in range(0, len(todo), self.batch_size):
            batch = todo[begin : begin + self.batch_size]
            questions = [Question(ctx, fmt, derive_seed(self.seed, ctx), others.get(ctx)) for ctx, fmt in batch]
            began = time.perf_counter()
            with torch.inference_mode():
                start = self.method.prepare(questions, decoding)
                trace_tokens = start.trace_tokens()
                final_backbone = self.method.final_backbone(start)
                continuations = [
                    [final_backbone.encode(requests[i].args[1].lstrip()) for i in groups[k]] for k in batch
                ]
                with self.method.acting_as(FINAL_ROLE):
                    scores = score_continuations(
                        final_backbone, start.prompts, start.trace, continuations, prompt_embeds=start.prompt_embeds
                    )
            seconds = (time.perf_counter() - began) / len(batch)
            records = []
            for row, key in enumerate(batch):
                for index, score in zip(groups[key], scores[row], strict=True):
                    results[index] = score
                final = {
                    "prompt_tokens": len(start.prompts[row]),
                    "generated_tokens": 0,
                    "continuations": len(groups[key]),
                }
                records.append(
                    self._record(
                        requests[groups[key][0]],
                        "loglikelihood",
                        start,
                        row,
                        final,
                        trace_tokens[row],
                        seconds,
                        questions[row].seed,
                        store_keys[key],
                        scores[row],
                    )
                )
                bar.update(len(groups[key]))
            self._write(records)
        bar.close()
        self._gather_totals()
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Single-agent semantics for every method: the backbone's rolling log-likelihood of the raw text
        (no chat template, no agents), in disjoint windows of the model's context length."""
        tokenizer = self.backbone.tokenizer
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else min(self.backbone.eos_token_ids)
        max_length = int(self.max_length or getattr(self.backbone.causal_lm.config, "max_position_embeddings", 2048))
        outputs = []
        for request in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm or self._rank != 0):
            tokens = self.backbone.encode(request.args[0])
            total = 0.0
            windows = map(make_disjoint_window, get_rolling_token_windows(tokens, prefix, max_length, 1))
            for context, continuation in windows:
                ids = torch.tensor([context + continuation], device=self.backbone.device)
                with torch.inference_mode():
                    logits = self.backbone.model(input_ids=ids).logits.float()
                logprobs = torch.log_softmax(logits[0, len(context) - 1 : -1], dim=-1)
                target = torch.tensor(continuation, device=logprobs.device)
                total += float(logprobs.gather(-1, target[:, None]).sum())
            outputs.append(total)
        self._gather_totals()
        return outputs

    # --- side-car: per-request accounting, and the store that lets an interrupted run resume ---

    def _default_sidecar(self) -> Path:
        # A random part: two evaluations started in the same second by one process must not share a store.
        stamp = time.strftime("%Y%m%d-%H%M%S")
        unique = uuid.uuid4().hex[:8]
        return cache_dir() / "sidecars" / f"{self.method_name}-{stamp}-{os.getpid()}-{unique}-rank{self._rank}.jsonl"

    def run_key(self) -> str:
        """Identity of what this run computes, down to the bit: method settings, backbone weights, prompt set, dtype,
        base seed, and what changes 16-bit rounding (batch size, processes, CPU kernels). Device and side-car path
        are left out."""
        info = self.get_model_info()["diffmas"]
        for volatile in ("totals", "sidecar", "sidecars", "version", "run_key", "adapter"):
            info.pop(volatile, None)
        return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _load_sidecar(self) -> None:
        """Index the finished requests an earlier run with the same run key left in the side-car file."""
        self._finished: dict[str, dict[str, Any]] = {}
        self._budgets: set[int] = set()  # final-agent budgets of the generations in `_finished`
        if not self.sidecar_path.is_file():
            return
        run_key = self.run_key()
        with self.sidecar_path.open(encoding="utf-8") as handle:
            for line in handle:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by an interrupted write
                    continue
                if record.get("run_key") == run_key and "result" in record:
                    self._finished[record["store_key"]] = record
                    if record.get("request_type") == "generate_until" and "budget" in (record.get("final") or {}):
                        self._budgets.add(int(record["final"]["budget"]))

    def _reuse_other_budget(self, item: tuple[Any, ...]) -> dict[str, Any] | None:
        """A greedy generation finished under another final-agent budget, valid for this one, as this request's record.

        Greedy decoding of the final agent reads the budget only to stop: a generation that ended (end of turn or a
        stop string) after fewer tokens than this request's budget is token for token what this budget would give.
        The upstream agents have budgets of their own (model arguments, part of the run key), and seeds matter only
        when sampling. So raising a task's budget recomputes only the generations the old budget cut off. Only where a
        row's output does not depend on its batch (`batch_invariant`, or batch size 1): the recomputed rows are batched
        anew. The record is stored again under this request's key, with this budget and `rebudgeted_from`.
        """
        _, context, gen_kwargs, answer_format, seed, request, store_key, partner, occurrence = item
        name = next((k for k in BUDGET_KEYS if k in gen_kwargs), None)
        if not self._budgets or name is None or not self._batch_independent():
            return None
        decoding = DecodingConfig.from_gen_kwargs(gen_kwargs, self.max_gen_toks)
        if decoding.sampling:
            return None
        budget = decoding.max_new_tokens
        # Budgets as numbers and as text: lm-eval keeps some command-line values as strings, and the key is JSON.
        for other in [b for n in sorted(self._budgets - {budget}, reverse=True) for b in (n, str(n))]:
            other_kwargs = {**gen_kwargs, name: other}
            other_key = json.dumps([context, other_kwargs], sort_keys=True, default=str)
            other_seed = derive_seed(self.seed, other_key, occurrence)
            record = self._finished.get(
                _store_key("generate_until", context, other_kwargs, answer_format, other_seed, partner)
            )
            final = (record or {}).get("final") or {}
            if final.get("stopped_before_budget") and int(final.get("generated_tokens", budget)) < budget:
                moved = {
                    **record,
                    "prompt_hash": prompt_hash(context),
                    "task": getattr(request, "task_name", None),
                    "doc_id": self._doc_id(request),
                    "final": {**final, "budget": budget},
                    "seed": seed,
                    "run_key": self._run_key,
                    "store_key": store_key,
                    "rebudgeted_from": int(other),
                }
                self._finished[store_key] = moved
                self._account(moved)
                self.totals["reused_requests"] += 1
                self.totals["rebudgeted_requests"] += 1
                return moved
        return None

    def _doc_id(self, request: Any) -> int | None:
        """The request's document index in its task (lm-eval's doc_id plus `doc_offset`), None when it has none."""
        doc_id = getattr(request, "doc_id", None)
        return None if doc_id is None else int(doc_id) + self.doc_offset

    def _batch_independent(self) -> bool:
        """Whether a row's outputs are the same in any batch (batch-invariant kernels on every backbone, or batch 1)."""
        return self.batch_size == 1 or all(is_batch_invariant(b.model) for b in self.method.backbones().values())

    def _reuse(self, store_key: str) -> Any:
        """The stored result of a finished request (its accounting counted again), or None."""
        record = self._finished.get(store_key)
        if record is None:
            return None
        self._account(record)
        self.totals["reused_requests"] += 1
        return record["result"]

    def _record(
        self,
        request: Any,
        request_type: str,
        start: Any,
        row: int,
        final: dict[str, Any],
        trace_tokens: int,
        seconds: float,
        seed: int,
        store_key: str,
        result: Any,
    ) -> dict[str, Any]:
        record = {
            "prompt_hash": prompt_hash(request.args[0]),
            "request_type": request_type,
            "task": getattr(request, "task_name", None),
            "doc_id": self._doc_id(request),
            "method": self.method_name,
            "seed": seed,
            "agents": [a.as_dict() for a in start.agents[row]],
            "final": final,
            "trace_tokens": trace_tokens,
            "wall_seconds": round(seconds, 6),
            "run_key": self._run_key,
            "store_key": store_key,
            "result": result,
        }
        if start.extra_cost is not None:
            record["extra"] = start.extra_cost[row]
        self._account(record)
        self._finished[store_key] = record
        return record

    def _write(self, records: list[dict[str, Any]]) -> None:
        """Append a finished batch and flush it to disk, so an interrupted run loses at most the batch under way."""
        with self.sidecar_path.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())

    def _account(self, record: dict[str, Any]) -> None:
        agents, final = record["agents"], record["final"]
        stopped = final.get("stopped_before_budget")
        self.totals.update(
            {
                "requests": 1,
                "prompt_tokens": sum(a["prompt_tokens"] for a in agents) + final["prompt_tokens"],
                "generated_tokens": sum(a["generated_tokens"] for a in agents) + final["generated_tokens"],
                "final_generated_tokens": final["generated_tokens"],
                "latent_steps": sum(a["latent_steps"] for a in agents),
                "trace_tokens": record["trace_tokens"],
                "final_stopped": int(bool(stopped)),
                "final_budget_hit": int(stopped is False),
            }
        )
        for name, value in (record.get("extra") or {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.totals[name] += value
        self.totals["wall_seconds"] += record["wall_seconds"]

    def _gather_totals(self) -> None:
        """Sum the totals over processes and collect every process's side-car path (a collective: every rank calls
        it at the end of each request type, so rank 0's results config describes the whole run)."""
        if self._world_size == 1:
            return
        gathered: list[Any] = [None] * self._world_size
        torch.distributed.all_gather_object(gathered, (dict(self.totals), str(self.sidecar_path)))
        summed: Counter[str] = Counter()
        for totals, _ in gathered:
            summed.update(totals)  # `update` keeps zero counts (`+` of Counters would drop them)
        self._all_totals = summed
        self._sidecars = [path for _, path in gathered]

    def get_model_info(self) -> dict[str, Any]:
        """Everything that identifies this run, merged by lm-eval into `results["config"]["diffmas"]`."""
        totals = self._all_totals if self._all_totals is not None else self.totals
        backbone = self.method.backbone
        info = {
            **self.method.settings(),
            "cpu_kernels": cpu_kernels_label(backbone.model),
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_gen_toks_default": self.max_gen_toks,
            "version": __version__,
            "world_size": self._world_size,
            "totals": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in totals.items()},
            "sidecar": str(self.sidecar_path),
            "run_key": getattr(self, "_run_key", None),
        }
        if self._sidecars is not None:
            info["sidecars"] = self._sidecars
        from diffmas_eval.benchmarks.code_exec import sandbox_status  # how generated code ran, if any did

        code_sandbox = sandbox_status()
        return {"diffmas": info, **({"code_sandbox": code_sandbox} if code_sandbox else {})}


_BACKENDS: dict[str, type[MultiAgentLM]] = {}


def backend_class(method_name: str) -> type[MultiAgentLM]:
    """The lm-eval backend class of a registered method, named after it (`LatentMAS` -> `LatentMASLM`)."""
    if method_name not in _BACKENDS:
        method = get_method(method_name)
        _BACKENDS[method_name] = type(
            f"{method.__name__}LM",
            (MultiAgentLM,),
            {"method_name": method_name, "__module__": __name__, "__doc__": f"lm-eval backend of `{method_name}`."},
        )
    return _BACKENDS[method_name]


def backends() -> dict[str, type[MultiAgentLM]]:
    """Every registered method's backend class by model name."""
    return {name: backend_class(name) for name in methods()}


def __getattr__(name: str) -> type[MultiAgentLM]:
    """`SingleAgentLM`, `LatentMASLM`, ...: the backend classes by class name (what entry points name)."""
    for method_name, method in methods().items():
        if f"{method.__name__}LM" == name:
            return backend_class(method_name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
