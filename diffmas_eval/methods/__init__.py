"""Communication methods, registered by lm-eval model name (`methods/registry.py`)."""

from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, MethodConfig, MultiAgentConfig, Question
from diffmas_eval.methods.diffmas import DiffMAS
from diffmas_eval.methods.latent_mas import LatentMAS
from diffmas_eval.methods.registry import get_method, methods, register_method
from diffmas_eval.methods.single_agent import SingleAgent
from diffmas_eval.methods.text_mas import TextMAS

__all__ = [
    "AgentCall",
    "DiffMAS",
    "LatentMAS",
    "SingleAgent",
    "TextMAS",
    "FinalAgentStart",
    "Method",
    "MethodConfig",
    "MultiAgentConfig",
    "Question",
    "get_method",
    "methods",
    "register_method",
]
