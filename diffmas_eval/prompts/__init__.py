"""Versioned role prompts: per method family, topology and role, plus one format instruction per answer format."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DEFAULT_PROMPT_SET = "diffmas-v1"
_SHIPPED = Path(__file__).resolve().parent
TOPOLOGIES = ("sequential", "hierarchical", "two_stage")
FINAL_ROLE = "judger"
ANSWER_FORMATS = ("boxed_number", "boxed_expression", "boxed_letter", "python_function", "letter")
_PLACEHOLDER = re.compile(r"\{(question|transcript)\}")


@dataclass(frozen=True)
class PromptSet:
    """A loaded prompt file. `sha256` is over the file's bytes; both name and hash go into every result."""

    name: str
    sha256: str
    data: dict[str, Any]
    path: str

    @property
    def system(self) -> str:
        return self.data.get("system") or ""

    def roles(self, family: str, topology: str) -> list[str]:
        """All roles of a method family (`single_agent`, `text_mas`, `latent_mas`) in order; the last is the judger."""
        table = self.data[family] if family == "single_agent" else self.data[family][topology]
        return list(table)

    def template(self, family: str, topology: str, role: str) -> str:
        table = self.data[family] if family == "single_agent" else self.data[family][topology]
        return table[role]

    def format_instruction(self, answer_format: str | None) -> str:
        if not answer_format or answer_format == "none":
            return ""
        try:
            return self.data["format_instructions"][answer_format]
        except KeyError:
            known = ", ".join(self.data["format_instructions"])
            message = f"unknown answer_format {answer_format!r}; prompt set {self.name!r} knows: {known}"
            raise ValueError(message) from None

    def render(
        self,
        family: str,
        topology: str,
        role: str,
        question: str,
        transcript: str = "",
        answer_format: str | None = None,
    ) -> str:
        """The user message of one agent. Only the final agent (`answer_format` given) gets the format instruction.

        Placeholders are filled in one pass over the template: a question or transcript that itself contains
        `{question}` or `{transcript}` is inserted verbatim.
        """
        values = {"question": question, "transcript": transcript.rstrip("\n")}
        text = _PLACEHOLDER.sub(lambda match: values[match[1]], self.template(family, topology, role))
        instruction = self.format_instruction(answer_format)
        return f"{text}\n\n{instruction}" if instruction else text

    def transcript_entry(self, role: str, text: str) -> str:
        label = role.replace("_", " ").title()
        return self.data["transcript_entry"].replace("{role}", label).replace("{text}", text.strip())


def load_prompt_set(name_or_path: str | None = None) -> PromptSet:
    """Load a shipped prompt set by name (default `diffmas-v1`) or a user YAML file with the same keys.

    Raises:
        FileNotFoundError / ValueError: unknown name, or a file missing keys the shipped set has.
    """
    name_or_path = name_or_path or DEFAULT_PROMPT_SET
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        path = _SHIPPED / f"{name_or_path}.yaml"
        if not path.is_file():
            shipped = ", ".join(p.stem for p in sorted(_SHIPPED.glob("*.yaml")))
            raise FileNotFoundError(f"prompts={name_or_path!r} is neither a file nor a shipped prompt set ({shipped})")
    raw = path.read_bytes()
    data = yaml.safe_load(raw)
    reference = yaml.safe_load((_SHIPPED / f"{DEFAULT_PROMPT_SET}.yaml").read_bytes())
    missing = _missing_keys(reference, data)
    if missing:
        raise ValueError(f"prompt file {path} lacks keys the shipped set has: {', '.join(missing)}")
    return PromptSet(
        name=str(data.get("name") or path.stem), sha256=hashlib.sha256(raw).hexdigest(), data=data, path=str(path)
    )


def _missing_keys(reference: dict, data: Any, prefix: str = "") -> list[str]:
    if not isinstance(data, dict):
        return [prefix.rstrip(".") or "<root>"]
    missing = []
    for key, value in reference.items():
        if key == "name":
            continue
        if key not in data:
            missing.append(prefix + key)
        elif isinstance(value, dict):
            missing += _missing_keys(value, data[key], f"{prefix}{key}.")
    return missing
