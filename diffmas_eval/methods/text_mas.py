"""TextMAS (methods.md §2): upstream agents write text; the judger reads the whole transcript."""

from __future__ import annotations

from typing import Any

from diffmas_eval.core.decode import DecodingConfig, derive_seed, generate
from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, Question


class TextMAS(Method):
    """Sequential: planner -> critic -> refiner -> judger, each reading the transcript so far.
    Hierarchical: math, science and code solvers answer independently (one batched decode), a summarizer judges."""

    name = "text-mas"
    family = "text_mas"

    def _run_agents(
        self,
        role_rows: list[tuple[str, int]],
        questions: list[Question],
        transcripts: list[str],
        decoding: DecodingConfig,
        agents: list[list[AgentCall]],
    ) -> list[str]:
        """Decode one text turn for every (role, row) pair in a single batch; returns the texts in that order."""
        prompts = [self.render(role, questions[row].text, transcripts[row]) for role, row in role_rows]
        seeds = [derive_seed(questions[row].seed, role) for role, row in role_rows]
        with self.acting_as(role_rows[0][0]):
            outputs = generate(self.backbone, prompts, None, decoding.for_upstream(self.max_new_tokens), seeds)
        for (role, row), prompt, out in zip(role_rows, prompts, outputs, strict=True):
            agents[row].append(
                AgentCall(role=role, prompt_tokens=len(prompt), generated_tokens=len(out.token_ids), text=out.text)
            )
        return [out.text for out in outputs]

    def prepare(self, questions: list[Question], decoding: DecodingConfig) -> FinalAgentStart:
        rows = range(len(questions))
        transcripts = [""] * len(questions)
        agents: list[list[AgentCall]] = [[] for _ in questions]
        if self.topology == "sequential":
            for role in self.upstream_roles:
                texts = self._run_agents([(role, r) for r in rows], questions, transcripts, decoding, agents)
                transcripts = [
                    t + self.prompts.transcript_entry(role, text) for t, text in zip(transcripts, texts, strict=False)
                ]
        else:
            pairs = [(role, r) for role in self.upstream_roles for r in rows]
            texts = self._run_agents(pairs, questions, transcripts, decoding, agents)
            for (role, r), text in zip(pairs, texts, strict=True):
                transcripts[r] += self.prompts.transcript_entry(role, text)
        return FinalAgentStart(
            prompts=[self.final_prompt(q, t) for q, t in zip(questions, transcripts, strict=False)],
            trace=None,
            agents=agents,
        )

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "communication": "text"}
