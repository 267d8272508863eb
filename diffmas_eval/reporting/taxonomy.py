"""Which domain a task belongs to, and which metric is its headline number.

Task names and metrics follow TEAM.md: `acc` everywhere except the code tasks (`pass_plus` headline, `pass_base`
shown beside it). `<task>_mc` variants (loglikelihood multiple choice) are their own columns and stay out of the
domain averages, so a benchmark is never counted twice.
"""

from __future__ import annotations

DOMAINS: dict[str, tuple[str, ...]] = {
    "math": ("mas_gsm8k", "mas_math500", "mas_aime24", "mas_aime25"),
    "science QA": ("mas_gpqa_diamond", "mas_arc_easy", "mas_arc_challenge", "mas_medqa"),
    "code": ("mas_humaneval_plus", "mas_mbpp_plus"),
    "commonsense": ("mas_commonsenseqa", "mas_openbookqa"),
}
OTHER_DOMAIN = "other"
DOMAIN_ORDER: tuple[str, ...] = (*DOMAINS, OTHER_DOMAIN)
CODE_TASKS = frozenset(DOMAINS["code"])
MC_SUFFIX = "_mc"

_TASK_DOMAIN = {task: domain for domain, tasks in DOMAINS.items() for task in tasks}
_TASK_ORDER = {task: i for i, task in enumerate(t for tasks in DOMAINS.values() for t in tasks)}


def base_task(task: str) -> str:
    """`mas_arc_easy_mc` -> `mas_arc_easy`; other names unchanged."""
    if task.endswith(MC_SUFFIX) and task[: -len(MC_SUFFIX)] in _TASK_DOMAIN:
        return task[: -len(MC_SUFFIX)]
    return task


def is_mc_variant(task: str) -> bool:
    """True for the loglikelihood multiple-choice variant of a known task."""
    return base_task(task) != task


def task_domain(task: str) -> str:
    """The domain of a task (its `_mc` variant shares it); unknown tasks go to `other`, never dropped."""
    return _TASK_DOMAIN.get(base_task(task), OTHER_DOMAIN)


def headline_metric(task: str) -> str:
    """The metric the leaderboard shows for a task: `pass_plus` for code, else `acc`."""
    return "pass_plus" if task in CODE_TASKS else "acc"


def secondary_metrics(task: str) -> tuple[str, ...]:
    """Metrics shown beside the headline (code: `pass_base`)."""
    return ("pass_base",) if task in CODE_TASKS else ()


def task_sort_key(task: str) -> tuple[int, int, int, str]:
    """Order tasks by domain, then the TEAM.md order, generative before `_mc`, unknown tasks alphabetically."""
    domain = DOMAIN_ORDER.index(task_domain(task))
    return (domain, _TASK_ORDER.get(base_task(task), len(_TASK_ORDER)), int(is_mc_variant(task)), task)


def counts_in_average(task: str) -> bool:
    """Whether a task enters the per-domain and overall averages (generative tasks only, not `_mc`)."""
    return not is_mc_variant(task)
