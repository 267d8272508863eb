"""The versioned prompt set: shipped default, a user's own file, and its identity in results."""

from __future__ import annotations

import hashlib

import pytest
import yaml

from diffmas_eval.prompts import DEFAULT_PROMPT_SET, PromptSet, load_prompt_set


def test_shipped_set_has_every_role_and_format():
    prompts = load_prompt_set()
    assert prompts.name == DEFAULT_PROMPT_SET
    assert prompts.roles("latent_mas", "sequential") == ["planner", "critic", "refiner", "judger"]
    assert prompts.roles("text_mas", "hierarchical")[-1] == "judger"
    for fmt in ("boxed_number", "boxed_expression", "boxed_letter", "python_function", "letter"):
        assert prompts.format_instruction(fmt)
    with pytest.raises(ValueError, match="unknown answer_format"):
        prompts.format_instruction("haiku")


def test_a_users_prompt_file_replaces_the_wording_and_is_identified_by_hash(tmp_path, tiny_model_dir):
    from diffmas_eval.lm_backend import LatentMASLM

    data = yaml.safe_load(open(load_prompt_set().path).read())
    data["name"] = "paper-wording"
    data["latent_mas"]["sequential"]["judger"] = "JUDGE THIS: {question}"
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(data))
    lm = LatentMASLM(
        pretrained=str(tiny_model_dir),
        dtype="float32",
        device="cpu",
        prompts=str(path),
        sidecar=str(tmp_path / "s.jsonl"),
    )
    info = lm.get_model_info()["diffmas"]["prompts"]
    assert info == {"name": "paper-wording", "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    rendered = lm.backbone.tokenizer.decode(lm.method.render("judger", "2+2?"))
    assert "JUDGE THIS: 2+2?" in rendered


def test_a_prompt_file_missing_keys_is_refused(tmp_path):
    data = yaml.safe_load(open(load_prompt_set().path).read())
    del data["text_mas"]["hierarchical"]["code_solver"]
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="text_mas.hierarchical.code_solver"):
        load_prompt_set(str(path))
    with pytest.raises(FileNotFoundError, match="shipped prompt set"):
        load_prompt_set("no-such-set")


def test_a_question_and_a_transcript_holding_placeholders_are_inserted_verbatim():
    template = "Q: {question}\nAgents:\n{transcript}\nAgain: {question}"
    prompts = PromptSet(name="t", sha256="", data={"text_mas": {"sequential": {"judger": template}}}, path="")
    question = "What does {transcript} mean?"
    transcript = "Planner: the {question} asks about {transcript}\n"
    rendered = prompts.render("text_mas", "sequential", "judger", question, transcript)
    assert rendered == (
        "Q: What does {transcript} mean?\nAgents:\nPlanner: the {question} asks about {transcript}"
        "\nAgain: What does {transcript} mean?"
    )
