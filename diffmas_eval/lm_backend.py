"""lm-eval model backends: a thin adapter from lm-eval requests to batches for a method, and back.

Model names: `single-agent`, `text-mas`, `latent-mas`, `diffmas`. All method logic lives in `diffmas_eval.methods`;
decoding and scoring in `diffmas_eval.core`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

import torch
from lm_eval.api.model import LM
from lm_eval.models.utils import Collator
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from diffmas_eval import __version__
from diffmas_eval.core.backbone import load_backbone, resolve_device, resolve_dtype
from diffmas_eval.core.decode import DecodingConfig, derive_seed, generate
from diffmas_eval.core.linear import uses_packed_cpu_linear
from diffmas_eval.core.score import score_continuations
from diffmas_eval.methods import METHODS, Method, Question
from diffmas_eval.methods.latent_mas import LatentMAS
from diffmas_eval.paths import cache_dir
from diffmas_eval.prompts import FINAL_ROLE, TOPOLOGIES, load_prompt_set

logger = logging.getLogger(__name__)

_COMMON_ARGS = (
    "pretrained",
    "dtype",
    "device",
    "batch_size",
    "max_batch_size",
    "topology",
    "max_new_tokens",
    "max_gen_toks",
    "enable_thinking",
    "system_prompt",
    "prompts",
    "seed",
    "fast_cpu_kernels",
    "sidecar",
    "device_map",
    "parallelize",
    "revision",
    "trust_remote_code",
    "max_length",
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


def _as_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


class MultiAgentLM(LM):
    """Base lm-eval backend. Subclasses pick the method (`method_name`) and may accept extra model args."""

    method_name: ClassVar[str]
    method_args: ClassVar[tuple[str, ...]] = ()

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

    def __init__(
        self,
        pretrained: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str | None = 1,
        max_batch_size: int | None = None,
        topology: str = "sequential",
        max_new_tokens: int = 256,
        max_gen_toks: int = 512,
        enable_thinking: bool | None = None,
        system_prompt: str | None = None,
        prompts: str | None = None,
        seed: int = 1234,
        sidecar: str | None = None,
        device_map: str | None = None,
        parallelize: bool = False,
        revision: str | None = None,
        trust_remote_code: bool = False,
        max_length: int | None = None,
        fast_cpu_kernels: bool = True,
        **method_kwargs: Any,
    ) -> None:
        super().__init__()
        # Validate everything a user can get wrong before loading any weights.
        unknown = sorted(set(method_kwargs) - set(self.method_args))
        if unknown:
            known = list(_COMMON_ARGS) + list(self.method_args)
            hints = [
                f"{u!r} (did you mean {difflib.get_close_matches(u, known, n=1)[0]!r}?)"
                if difflib.get_close_matches(u, known, n=1)
                else repr(u)
                for u in unknown
            ]
            raise ValueError(
                f"--model {self.method_name} does not take model arg(s) {', '.join(hints)}; "
                f"it takes: {', '.join(known)}"
            )
        self.batch_size = _parse_batch_size(batch_size)
        resolve_dtype(dtype)
        if topology not in TOPOLOGIES:
            raise ValueError(f"unknown topology {topology!r}; use one of {', '.join(TOPOLOGIES)}")
        if "latent_steps" in method_kwargs or "communication" in method_kwargs:
            LatentMAS.check_settings(method_kwargs.get("latent_steps", 0), method_kwargs.get("communication", "trace"))
        prompt_set = load_prompt_set(prompts)
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = max_length
        self.seed = int(seed)
        self._init_distributed(device)
        if self.method_name == "diffmas" and not method_kwargs.get("adapter"):
            # Checked here too so the error comes before the backbone is loaded.
            raise ValueError(
                "diffmas needs adapter=DIR (a directory written by `diffmas-train`); without it the "
                "method would silently be LatentMAS, so use --model latent-mas for that"
            )
        if _as_bool(parallelize) and device_map is None:
            device_map = "auto"
        self.backbone = load_backbone(
            pretrained,
            dtype=dtype,
            device=self._device,
            device_map=device_map,
            revision=revision,
            trust_remote_code=_as_bool(trust_remote_code),
            fast_cpu_kernels=_as_bool(fast_cpu_kernels),
        )
        self.method: Method = METHODS[self.method_name](
            self.backbone,
            prompt_set,
            topology=topology,
            system_prompt=system_prompt,
            enable_thinking=_as_bool(enable_thinking),
            max_new_tokens=max_new_tokens,
            **{k: (_as_bool(v) if k == "realign" else v) for k, v in method_kwargs.items()},
        )
        self.prompt_set = prompt_set
        self.totals: Counter[str] = Counter()
        self.sidecar_path = Path(sidecar) if sidecar else self._default_sidecar()
        if sidecar and self._world_size > 1:  # one file per process: appends from several processes could interleave
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
        items = []
        occurrences: Counter[str] = Counter()
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            answer_format = self._answer_format(request, gen_kwargs)
            gen_kwargs.pop("answer_format", None)
            key = json.dumps([context, gen_kwargs], sort_keys=True, default=str)
            # Repeats of one request (lm-eval clones them) get different seeds; nothing depends on batch or order.
            seed = derive_seed(self.seed, key, occurrences[key])
            occurrences[key] += 1
            store_key = _store_key("generate_until", context, gen_kwargs, answer_format, seed)
            items.append((index, context, gen_kwargs, answer_format, seed, request, store_key))
        outputs: list[str | None] = [self._reuse(it[6]) for it in items]
        todo = [it for it, out in zip(items, outputs, strict=True) if out is None]
        others = self._other_contexts([it[1] for it in items]) if self._needs_other_doc() else {}
        tokens = self._token_counts([it[1] for it in todo])
        collator = Collator(
            todo, sort_fn=lambda it: (-tokens[it[1]], it[0]), group_fn=lambda it: it[2], group_by="gen_kwargs"
        )
        bar = tqdm(total=len(todo), desc=f"{self.method_name} generate_until", disable=disable_tqdm or self._rank != 0)
        for batch in collator.get_batched(n=self.batch_size):
            decoding = DecodingConfig.from_gen_kwargs(batch[0][2], self.max_gen_toks)
            questions = [Question(it[1], it[3], it[4], others.get(it[1])) for it in batch]
            began = time.perf_counter()
            with torch.inference_mode():
                start = self.method.prepare(questions, decoding)
                trace_tokens = start.trace_tokens()
                with self.method.acting_as(FINAL_ROLE):
                    generations = generate(
                        self.backbone, start.prompts, start.trace, decoding, [q.seed for q in questions]
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
                        start.agents[row],
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
        return outputs

    def _needs_other_doc(self) -> bool:
        return getattr(self.method, "communication", None) == "other_doc"

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
        store_keys = {
            key: _store_key("loglikelihood", key[0], [requests[i].args[1] for i in members], key[1])
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
        others = self._other_contexts([k[0] for k in groups]) if self._needs_other_doc() else {}
        decoding = DecodingConfig(max_new_tokens=self.max_gen_toks)
        bar = tqdm(
            total=sum(len(groups[k]) for k in todo),
            desc=f"{self.method_name} loglikelihood",
            disable=disable_tqdm or self._rank != 0,
        )
        for begin in range(0, len(todo), self.batch_size):
            batch = todo[begin : begin + self.batch_size]
            questions = [Question(ctx, fmt, derive_seed(self.seed, ctx), others.get(ctx)) for ctx, fmt in batch]
            continuations = [[self.backbone.encode(requests[i].args[1].lstrip()) for i in groups[k]] for k in batch]
            began = time.perf_counter()
            with torch.inference_mode():
                start = self.method.prepare(questions, decoding)
                trace_tokens = start.trace_tokens()
                with self.method.acting_as(FINAL_ROLE):
                    scores = score_continuations(self.backbone, start.prompts, start.trace, continuations)
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
                        start.agents[row],
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
        return outputs

    # --- side-car: per-request accounting, and the store that lets an interrupted run resume ---

    def _default_sidecar(self) -> Path:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return cache_dir() / "sidecars" / f"{self.method_name}-{stamp}-{os.getpid()}-rank{self._rank}.jsonl"

    def run_key(self) -> str:
        """Identity of what this run computes: method settings, backbone weights, prompt set, dtype, base seed.

        Batch size, device, world size and CPU kernels are left out: results do not depend on them (beyond
        floating-point rounding)."""
        info = self.get_model_info()["diffmas"]
        for volatile in ("totals", "sidecar", "batch_size", "world_size", "version", "run_key", "cpu_kernels"):
            info.pop(volatile, None)
        return hashlib.sha256(json.dumps(info, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _load_sidecar(self) -> None:
        """Index the finished requests an earlier run with the same run key left in the side-car file."""
        self._finished: dict[str, dict[str, Any]] = {}
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
        agents: list[Any],
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
            "doc_id": getattr(request, "doc_id", None),
            "method": self.method_name,
            "seed": seed,
            "agents": [a.as_dict() for a in agents],
            "final": final,
            "trace_tokens": trace_tokens,
            "wall_seconds": round(seconds, 6),
            "run_key": self._run_key,
            "store_key": store_key,
            "result": result,
        }
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
        self.totals["wall_seconds"] += record["wall_seconds"]

    def get_model_info(self) -> dict[str, Any]:
        """Everything that identifies this run, merged by lm-eval into `results["config"]["diffmas"]`."""
        settings = self.method.settings()
        info = {
            **settings,
            "backbone": self.backbone.name,
            "backbone_fingerprint": self.backbone.fingerprint,
            "adapter": settings.get("adapter"),
            "latent_steps": settings.get("latent_steps"),
            "realign": settings.get("realign"),
            "prompts": {"name": self.prompt_set.name, "sha256": self.prompt_set.sha256},
            "dtype": str(self.backbone.dtype).removeprefix("torch."),
            "cpu_kernels": "packed" if uses_packed_cpu_linear(self.backbone.model) else "stock",
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_gen_toks_default": self.max_gen_toks,
            "version": __version__,
            "world_size": self._world_size,
            "totals": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.totals.items()},
            "sidecar": str(self.sidecar_path),
            "run_key": getattr(self, "_run_key", None),
        }
        return {"diffmas": info}


class SingleAgentLM(MultiAgentLM):
    method_name = "single-agent"
    method_args = ("adapter",)


class TextMASLM(MultiAgentLM):
    method_name = "text-mas"


class LatentMASLM(MultiAgentLM):
    method_name = "latent-mas"
    method_args = ("latent_steps", "realign", "communication")


class DiffMASLM(MultiAgentLM):
    method_name = "diffmas"
    method_args = ("latent_steps", "realign", "communication", "adapter")


BACKENDS: dict[str, type[MultiAgentLM]] = {
    cls.method_name: cls for cls in (SingleAgentLM, TextMASLM, LatentMASLM, DiffMASLM)
}
