"""diffmas-eval: multi-agent LLM communication methods as lm-evaluation-harness backends.

Importing this package is cheap on purpose: it is imported at interpreter start-up by the `.pth` hook
(`diffmas_eval._hook`), so nothing heavy (torch, transformers, lm-eval) may be imported here.
"""

__version__ = "0.1.0"
