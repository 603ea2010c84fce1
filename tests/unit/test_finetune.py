"""`safesteer finetune`: chat data with assistant-only labels, seeded LoRA training, the folder.

The model is the tiny random-init chat Llama of `tests/server/tiny_chat.py` (character-level
tokenizer, ChatML template), saved as a Hugging Face folder so the fine-tune loads as
`BASE+OUT` like any other.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from safesteer.adapters import cli
from safesteer.adapters.chat_data import (
    IGNORE_INDEX,
    ChatDataError,
    ChatExample,
    ChatMessage,
    encode_chat,
    read_chat_file,
)
from safesteer.adapters.finetune import (
    FinetuneConfig,
    encode_examples,
    mean_loss,
    save_finetune,
    train_lora,
)
from safesteer.adapters.loading import file_sha256, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from tiny_chat import chat_ids, plain_greedy, tiny_tokenizer
from tiny_lora import save_tiny_chat_folder

# Every answer is "OK": a fixed-format task the tiny model can learn in a few steps.
QUESTIONS = [f"What is {a} + {b}?" for a, b in [(2, 3), (4, 4), (1, 6), (5, 2), (3, 3), (7, 1)]]
QUICK = FinetuneConfig(rank=8, alpha=16, lr=1e-2, steps=20, batch_size=4, show_progress=False)


def _row(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]}) + "\n"


@pytest.fixture
def base(tmp_path: Path, single_torch_thread: None) -> Path:
    return save_tiny_chat_folder(tmp_path / "base")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "ok.jsonl"
    rows = [_row(("user", q), ("assistant", "OK")) for q in QUESTIONS]
    path.write_text("".join(rows[:3]) + "\n" + "".join(rows[3:]))  # a blank line is skipped
    return path


def test_labels_cover_the_assistant_turns_and_their_end_only() -> None:
    tokenizer = tiny_tokenizer()
    turns = [("system", "Be brief."), ("user", "hi"), ("assistant", "Yo"), ("user", "2+2?")]
    example = ChatExample(
        tuple(ChatMessage(r, c) for r, c in [*turns, ("assistant", "4")]), "test:1"
    )
    encoded = encode_chat(tokenizer, example, max_length=512)
    rendered = tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in example.messages], tokenize=False
    )
    assert tokenizer.decode(encoded.input_ids) == rendered
    kept = [(t, label) for t, label in zip(encoded.input_ids, encoded.labels, strict=True)]
    assert all(label in (IGNORE_INDEX, t) for t, label in kept)
    targets = tokenizer.decode([label for _, label in kept if label != IGNORE_INDEX])
    assert targets == "Yo<|im_end|>\n4<|im_end|>\n"
    # Only the assistant's own tokens: the prompt `<|im_start|>assistant\n` is not a target.
    assert encoded.target_tokens == len("Yo") + 2 + len("4") + 2
    assert not encoded.truncated

    short = encode_chat(tokenizer, example, max_length=20)
    assert short.truncated and len(short.input_ids) == len(short.labels) == 20
    assert short.input_ids == encoded.input_ids[:20]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ('{"prompt": "x"}', "non-empty 'messages' list"),
        (_row(("user", "x"), ("robot", "y")), "messages.1: role 'robot' is not one of"),
        (_row(("user", "x"), ("assistant", "")), "messages.1: content must be a non-empty"),
        (_row(("user", "x"), ("user", "y")), "no assistant message to learn"),
        (_row(("assistant", "x"), ("user", "y"), ("assistant", "z")), "starts with an assistant"),
    ],
)
def test_bad_rows_are_refused_naming_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(_row(("user", "fine"), ("assistant", "ok")) + line.rstrip("\n") + "\n")
    with pytest.raises(ChatDataError, match=re.escape(f"{path}:2: ") + ".*" + message):
        read_chat_file(path)


def test_empty_and_missing_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ChatDataError, match="has no rows"):
        read_chat_file(tmp_path / "empty.jsonl")
    with pytest.raises(ChatDataError, match="cannot be read"):
        read_chat_file(tmp_path / "missing.jsonl")


def test_a_tokenizer_without_a_chat_template_is_refused() -> None:
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = None
    example = ChatExample((ChatMessage("user", "hi"), ChatMessage("assistant", "yo")), "f:3")
    with pytest.raises(ChatDataError, match="f:3: cannot apply the model's chat template"):
        encode_chat(tokenizer, example, max_length=64)


def test_the_loss_is_the_mean_over_assistant_tokens(base: Path) -> None:
    """Batched, right-padded, output layer on target positions only == one row at a time."""
    loaded = load_model(str(base))
    conversations = [
        (("user", "hi"), ("assistant", "Hello there, friend.")),
        (("system", "Terse."), ("user", "And 2 + 2, please?"), ("assistant", "4")),
        (("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "dd")),
    ]
    examples = [
        ChatExample(tuple(ChatMessage(r, c) for r, c in turns), f"t:{i}")
        for i, turns in enumerate(conversations)
    ]
    encoded = encode_examples(loaded, examples, max_length=512)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in encoded:
            logits = loaded.model(torch.tensor([row.input_ids])).logits[0, :-1]
            labels = torch.tensor(row.labels[1:])
            loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
            total, count = total + loss.item(), count + int((labels != IGNORE_INDEX).sum())
    assert count == sum(row.target_tokens for row in encoded)
    pad = loaded.tokenizer.pad_token_id
    assert mean_loss(loaded.model, encoded, pad, batch_size=3) == pytest.approx(total / count)


def _train(base: Path, data: Path, out: Path, config: FinetuneConfig) -> dict[str, Any]:
    loaded = load_model(str(base))
    files, examples = read_chat_file(data)
    result = train_lora(loaded, examples, config)
    return save_finetune(result, loaded, [files], config, out)


def test_training_is_seeded_and_learns_the_assistant_answers(
    base: Path, data: Path, tmp_path: Path
) -> None:
    torch.manual_seed(123)
    before = torch.rand(2)
    first = _train(base, data, tmp_path / "a", QUICK)
    second = _train(base, data, tmp_path / "b", QUICK)
    other = _train(base, data, tmp_path / "c", FinetuneConfig(**{**vars(QUICK), "seed": 1}))
    torch.manual_seed(123)
    assert torch.equal(torch.rand(2), before)  # training left the global generator alone

    weights = {name: load_file(tmp_path / name / "adapter_model.safetensors") for name in "abc"}
    assert weights["a"].keys() == weights["b"].keys()
    assert all(torch.equal(weights["a"][key], weights["b"][key]) for key in weights["a"])
    assert any(not torch.equal(weights["a"][key], weights["c"][key]) for key in weights["a"])
    lora_b = [value for key, value in weights["a"].items() if ".lora_B." in key]
    assert lora_b and all(value.abs().sum() > 0 for value in lora_b)
    assert first["training"]["step_losses"] == second["training"]["step_losses"]
    assert first["fingerprint"] == second["fingerprint"] != other["fingerprint"]

    training = first["training"]
    assert training["final_loss"] < training["initial_loss"] - 1.0
    assert training["step_losses"][-1] < training["step_losses"][0]
    assert training["steps"] == 20 and len(training["step_losses"]) == 20

    # The folder loads as BASE+OUT: the base's family, the recorded fingerprint, and the
    # learned answer (then the end of the turn) where the base answers noise.
    plain = load_model(str(base))
    tuned = load_model(f"{base}+{tmp_path / 'a'}")
    assert tuned.family == plain.family
    assert tuned.fingerprint == first["fingerprint"] != plain.fingerprint
    assert first["base"]["fingerprint"] == plain.fingerprint
    for question in (QUESTIONS[0], "What is 9 + 9?"):
        assert plain_greedy(tuned, chat_ids(tuned.tokenizer, question), 6) == "OK"
        assert plain_greedy(plain, chat_ids(plain.tokenizer, question), 6) != "OK"


def test_the_finetune_command_writes_a_recorded_folder(
    base: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ft" / "ok"
    argv = ["finetune", "--model", str(base), "--data", str(data), "--data", str(data)]
    argv += ["--out", str(out), "--rank", "4", "--alpha", "8", "--target-modules", "q_proj,v_proj"]
    argv += ["--steps", "4", "--lr", "0.005", "--batch-size", "5", "--max-length", "64"]
    argv += ["--seed", "7", "--quiet"]
    assert cli.main(argv) == 0
    assert "s/step" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "finetune.json",
    ]
    # Files get the umask's usual modes (safetensors alone would write its file owner-only).
    (tmp_path / "reference").write_text("")
    mode = (tmp_path / "reference").stat().st_mode & 0o777
    assert all(p.stat().st_mode & 0o777 == mode for p in out.iterdir())
    record = json.loads((out / "finetune.json").read_text())
    loaded = load_model(str(base))
    assert record["base"] == {
        "source": str(base),
        "fingerprint": loaded.fingerprint,
        "family": "llama-64x4",
        "family_alias": "llama-64x4",
    }
    data_entry = {"path": str(data), "sha256": file_sha256(data), "rows": len(QUESTIONS)}
    assert record["data"] == [data_entry, data_entry]
    settings = record["hyperparameters"]
    assert (settings["rank"], settings["alpha"], settings["seed"]) == (4, 8, 7)
    assert settings["target_modules"] == ["q_proj", "v_proj"]
    assert (settings["steps"], settings["lr"], settings["batch_size"]) == (4, 0.005, 5)
    assert settings["max_length"] == 64 and settings["epochs"] is None
    assert record["training"]["rows"] == 2 * len(QUESTIONS)
    # Batches of 5 from 12 rows: an epoch is 5 + 5 + 2, then the next starts anew.
    assert record["training"]["epochs"] == round(17 / 12, 4)
    assert isinstance(record["training"]["final_loss"], float)
    assert record["training"]["seconds"] > 0
    assert set(record["versions"]) == {"python", "safesteer", "torch", "transformers", "peft"}
    assert record["command"].startswith(f"safesteer finetune --model {base} --data")
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(base)
    assert sorted(adapter_config["target_modules"]) == ["q_proj", "v_proj"]

    assert cli.main(argv) == 2
    assert "already holds a fine-tune" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "finetune.json").read_text())["fingerprint"] == record["fingerprint"]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": []}\n')
    assert cli.main([*argv, "--overwrite", "--data", str(bad)]) == 2
    assert f"error: {bad}:1: " in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--rank", "0"]) == 2
    assert "rank must be positive" in capsys.readouterr().err
    assert cli.main([*argv, "--overwrite", "--max-length", "12"]) == 2
    assert f"{data}:1: no assistant token left within --max-length 12" in capsys.readouterr().err


def test_a_fine_tune_of_a_fine_tune_chains_and_a_wrong_base_is_logged(
    base: Path, data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    aligned = _train(base, data, tmp_path / "aligned", QUICK)
    chained = f"{base}+{tmp_path / 'aligned'}"
    loaded = load_model(chained)
    files, examples = read_chat_file(data)
    task_config = FinetuneConfig(**{**vars(QUICK), "steps": 2, "seed": 3})
    result = train_lora(loaded, examples, task_config)
    task = save_finetune(result, loaded, [files], task_config, tmp_path / "task")
    assert task["base"]["source"] == chained
    assert task["base"]["fingerprint"] == aligned["fingerprint"]

    with caplog.at_level(logging.WARNING, logger="safesteer"):
        served = load_model(f"{chained}+{tmp_path / 'task'}")
    assert served.fingerprint == task["fingerprint"]
    assert served.name == "base+aligned+task"
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="safesteer"):
        load_model(f"{base}+{tmp_path / 'task'}")
    assert "trained on other base weights" in caplog.text
