"""Communication methods, registered by lm-eval model name (`methods/registry.py`)."""

from diffmas_eval.methods.base import AgentCall, FinalAgentStart, Method, MethodConfig, MultiAgentConfig, Question
from diffmas_eval.methods.registry import get_method, methods, register_method

__all__ = [
    "AgentCall",
    "FinalAgentStart",
    "Method",
    "MethodConfig",
    "MultiAgentConfig",
    "Question",
    "get_method",
    "methods",
    "register_method",
]
