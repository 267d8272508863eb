"""Communication methods, by lm-eval model name."""

from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, Question
from diffmas_eval.methods.diffmas import DiffMAS
from diffmas_eval.methods.latent_mas import LatentMAS
from diffmas_eval.methods.single_agent import SingleAgent
from diffmas_eval.methods.text_mas import TextMAS

METHODS: dict[str, type[Method]] = {m.name: m for m in (SingleAgent, TextMAS, LatentMAS, DiffMAS)}

__all__ = [
    "METHODS",
    "AgentCall",
    "DiffMAS",
    "FinalAgentStart",
    "LatentMAS",
    "Method",
    "Question",
    "SingleAgent",
    "TextMAS",
]
