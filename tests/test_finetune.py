"""`phi3flow finetune`: config, assistant-only labels, packing, Phi-3's fused LoRA targets, CPU runs, resume.

Tests marked `model` load the embedded model's tokenizer or weights; they train for a handful of steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithFlattening,
    TrainerCallback,
    TrainingArguments,
)

from conftest import PHI3_TARGETS, small_config, tiny_phi3
from phi3flow.data import sample
from phi3flow.finetune import chat, config, train

QUESTIONS = ["What is the capital of Peru?", "What is 7 plus 5?", "Which day comes after Friday?"]


# --- config -------------------------------------------------------------------------------------------


def test_shipped_configs() -> None:
    gpu, cpu = config.load_config("phi3-mini-qlora"), config.load_config(config.DEFAULT_CONFIG)
    assert isinstance(gpu.training, TrainingArguments)  # transformers' own, not a mirror
    assert gpu.finetune.model == "microsoft/Phi-3-mini-4k-instruct"
    assert gpu.finetune.target_modules == PHI3_TARGETS
    assert gpu.finetune.load_in_4bit and gpu.training.activation_checkpointing
    # fastest on a GPU (bench/gpu.py; README "On a GPU")
    assert gpu.training.train_sampling_strategy == "group_by_length" and not gpu.finetune.packing
    assert gpu.training.warmup_steps == 0.2 and gpu.training.eval_strategy == "steps"  # upstream names, as written
    assert config.read_config("phi3-mini-qlora")["bf16"]  # asked for; what it becomes depends on the GPU (below)
    assert cpu.finetune.model == config.EMBEDDED and not cpu.finetune.load_in_4bit and not cpu.training.bf16
    assert cpu.finetune.target_modules == ["all-linear"] and cpu.finetune.packing
    assert cpu.training.train_sampling_strategy == "random"


def test_cli_flags_override_yaml(tmp_path: Path) -> None:
    cfg, args = config.parse_config(
        train.build_parser(),
        [
            "--config",
            "embedded-lora-cpu",
            "--max-steps",
            "3",
            "--no-packing",
            "--target-modules",
            "q_proj, v_proj",
            "--output-dir",
            str(tmp_path),
            "--warmup_steps",
            "5",
            "--resume",
        ],
    )
    assert (cfg.training.max_steps, cfg.finetune.packing, cfg.output_dir) == (3, False, str(tmp_path))
    assert cfg.finetune.target_modules == ["q_proj", "v_proj"] and cfg.training.warmup_steps == 5
    assert args.resume and not args.merge
    yaml_only = config.load_config("embedded-lora-cpu")
    assert cfg.training.learning_rate == yaml_only.training.learning_rate == 1e-3  # untouched: the YAML value
    assert yaml_only.finetune.packing and yaml_only.training.max_steps == -1
    # programmatic overrides (benches, tests) sit between the file and the flags
    both = config.parse_config(train.build_parser(), ["--max-steps", "7"], {"max_steps": 5, "lora_r": 4})[0]
    assert (both.training.max_steps, both.finetune.lora_r) == (7, 4)


@pytest.mark.parametrize(
    ("bf16", "cuda", "expected"),
    [
        (True, None, (False, False)),  # CPU: fp32
        (True, True, (True, False)),  # Ampere and newer: bf16
        (True, False, (False, True)),  # T4, V100: fp16
        (False, True, (False, False)),
    ],
)
def test_bf16_becomes_what_the_hardware_computes(bf16, cuda, expected, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda is not None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    values = {"bf16": bf16, "fp16": False}
    config.resolve_precision(values)
    assert (values["bf16"], values["fp16"]) == expected
    dtype = {(True, False): torch.bfloat16, (False, True): torch.float16, (False, False): torch.float32}[expected]
    assert train.compute_dtype(SimpleNamespace(bf16=expected[0], fp16=expected[1])) == dtype


def test_bad_configs_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: x\nlearning_rat: 0.1\nwarmup_ratio: 0.1\n")
    with pytest.raises(
        config.ConfigError,
        match=r"unknown setting.*learning_rat \(did you mean learning_rate\?\)"
        r".*warmup_ratio \(now warmup_steps",
    ):
        config.load_config(bad)
    with pytest.raises(config.ConfigError, match="phi3-mini-qlora"):
        config.load_config("no-such-config")
    bad.write_text("max_steps: ten\n")
    with pytest.raises(config.ConfigError, match="bad.yaml.*max_steps.*invalid int value: 'ten'"):
        config.load_config(bad)
    with pytest.raises(config.ConfigError, match="lr_scheduler_type.*invalid choice: 'nope'"):
        config.parse_config(train.build_parser(), ["--lr-scheduler-type", "nope"])
    with pytest.raises(config.ConfigError, match="max_seq_length must be at least 1"):
        config.load_config(config.DEFAULT_CONFIG, {"max_seq_length": 0})
    with pytest.raises(config.ConfigError, match="target_modules is empty"):
        config.FinetuneArguments(target_modules=[" , "])


def test_bad_training_data_is_reported_before_loading_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "train.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert train.main(["--train-file", str(bad), "--test-file", str(bad), "--output-dir", str(tmp_path / "o")]) == 1
    assert "line 1: the conversation must end with an assistant turn" in capsys.readouterr().err


# --- LoRA targets on Phi-3's fused projections ----------------------------------------------------------


def test_unfused_names_on_phi3_fail_loudly() -> None:
    model = tiny_phi3(128)
    with pytest.raises(train.TrainError, match="q_proj, k_proj, v_proj.*qkv_proj"):
        train.check_target_modules(model, ["q_proj", "k_proj", "v_proj", "o_proj"])
    train.check_target_modules(model, PHI3_TARGETS)


def test_phi3_lora_adapts_every_fused_projection() -> None:
    peft_model = train.apply_lora(tiny_phi3(128), config.FinetuneArguments(target_modules=PHI3_TARGETS))
    lora_a = [name for name, _ in peft_model.named_parameters() if "lora_A" in name]
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name in lora_a}
    assert adapted == set(PHI3_TARGETS)


# --- chat template: end of turn, pad, assistant-only labels -------------------------------------------


@pytest.mark.model
def test_end_of_turn_and_pad_come_from_the_template(tokenizer) -> None:
    end = chat.end_of_turn_id(tokenizer)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tokenize=False
    )
    assert rendered.rstrip().endswith(tokenizer.convert_ids_to_tokens(end))
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    chat.ensure_distinct_pad(tok, end)
    assert tok.pad_token_id is not None and tok.pad_token_id != end


@pytest.mark.model
def test_labels_cover_assistant_turns_only(tokenizer) -> None:
    end = chat.end_of_turn_id(tokenizer)
    messages = [
        {"role": "user", "content": "Question one?"},
        {"role": "assistant", "content": "Answer one."},
        {"role": "user", "content": "Question two?"},
        {"role": "assistant", "content": "Answer two."},
    ]
    example = chat.tokenize_conversation(tokenizer, messages, 512, end)
    labelled = [t for t, label in zip(example["input_ids"], example["labels"]) if label != chat.IGNORE_INDEX]
    assert labelled == [t for t, label in zip(example["input_ids"], example["labels"]) if label == t]
    assert labelled.count(end) == 2  # each assistant turn learns to end
    text = tokenizer.decode(labelled)
    assert "Answer one." in text and "Answer two." in text and "Question" not in text
    truncated = chat.tokenize_conversation(tokenizer, messages, 8, end)
    assert len(truncated["input_ids"]) == 8


@pytest.mark.model
def test_packed_loss_equals_padded_loss(tokenizer) -> None:
    """Packing must not let conversations attend to each other: same loss as a padded batch."""
    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    end = chat.end_of_turn_id(tok)
    chat.ensure_distinct_pad(tok, end)
    model = tiny_phi3(len(tok))
    train.configure_for_training(model, tok)
    features = [chat.tokenize_conversation(tok, row["messages"], 128, end) for row in sample.sample_rows(4, seed=5)]
    assert len({len(f["input_ids"]) for f in features}) > 1  # lengths differ, so padding happens
    padded = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=chat.IGNORE_INDEX)(features)
    packed = DataCollatorWithFlattening()(features)
    assert packed["input_ids"].shape[0] == 1 and tok.pad_token_id not in packed["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(**packed).loss, model(**padded).loss)
        packed_logits = model(**packed).logits[0]
        start = 0
        for feature in features:  # each conversation alone: identical logits, so nothing leaks across
            alone = model(input_ids=torch.tensor([feature["input_ids"]])).logits[0]
            end_ = start + len(feature["input_ids"])
            torch.testing.assert_close(packed_logits[start:end_], alone, rtol=1e-4, atol=1e-4)
            start = end_


# --- training ------------------------------------------------------------------------------------------


def logits(model, tokenizer, text: str = "What is the capital of Peru?") -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.model
def test_tiny_phi3_trains_and_round_trips(tmp_path: Path, sample_files, tiny_phi3_dir: Path, tokenizer) -> None:
    cfg = small_config(
        tmp_path, sample_files, model=str(tiny_phi3_dir), target_modules=PHI3_TARGETS, max_steps=3, learning_rate=1e-2
    )
    prepared = train.prepare(cfg)
    metrics = train.train(prepared)
    trained = prepared.trainer.model.eval()
    expected = logits(trained, tokenizer)
    metadata = train.save_outputs(prepared, metrics, merge=True)

    out = Path(cfg.output_dir)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == set(PHI3_TARGETS)
    assert adapter_config["base_model_name_or_path"] == str(tiny_phi3_dir)
    weights = load_file(out / "adapter_model.safetensors")
    for target in PHI3_TARGETS:
        lora_b = [w for name, w in weights.items() if f"{target}.lora_B" in name]
        assert lora_b and all(w.abs().sum() > 0 for w in lora_b), f"{target} was not trained"

    base = AutoModelForCausalLM.from_pretrained(tiny_phi3_dir).eval()
    assert not torch.allclose(logits(base, tokenizer), expected, atol=1e-4)
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(base, out).eval()
    torch.testing.assert_close(logits(reloaded, tokenizer), expected)
    merged = AutoModelForCausalLM.from_pretrained(out / train.MERGED_DIR).eval()
    torch.testing.assert_close(logits(merged, tokenizer), expected, rtol=1e-4, atol=1e-4)
    stop = merged.generation_config.eos_token_id
    assert chat.end_of_turn_id(tokenizer) in (stop if isinstance(stop, list) else [stop])

    saved = json.loads((out / train.METADATA_FILE).read_text())
    assert saved == json.loads(json.dumps(metadata))
    assert saved["data"]["train"]["sha256"] == train.sha256_file(sample_files[0])
    assert saved["base_model_name_or_path"] == str(tiny_phi3_dir)
    assert saved["pad_token"] != saved["end_of_turn_token"]
    assert saved["metrics"]["global_step"] == 3
    assert saved["config"]["finetune"]["target_modules"] == PHI3_TARGETS
    assert saved["config"]["training"]["learning_rate"] == 1e-2 and saved["config"]["training"]["output_dir"] == str(out)
    assert prepared.trainer.args.output_dir == str(out / train.CHECKPOINT_DIR)
    assert (out / "tokenizer_config.json").is_file()


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory: pytest.TempPathFactory, sample_files):
    """One short real run on the embedded model: loss on a training subset before and after, and its output."""
    tmp = tmp_path_factory.mktemp("embedded")
    cfg = small_config(tmp, sample_files, max_steps=12, learning_rate=2e-3)
    prepared = train.prepare(cfg)
    probe = prepared.trainer.train_dataset[:8]
    before = prepared.trainer.evaluate(eval_dataset=probe)["eval_loss"]
    metrics = train.train(prepared)
    after = prepared.trainer.evaluate(eval_dataset=probe)["eval_loss"]
    train.save_outputs(prepared, metrics)
    return cfg, before, after


@pytest.mark.model
def test_short_embedded_run_lowers_training_loss(embedded_run) -> None:
    cfg, before, after = embedded_run
    assert after < before * 0.8, (before, after)
    out = Path(cfg.output_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json", train.METADATA_FILE):
        assert (out / name).is_file(), name


@pytest.mark.model
def test_adapter_loads_in_the_scoring_script_and_changes_answers(embedded_run) -> None:
    pytest.importorskip("azureml_inference_server_http")
    from conftest import ask
    from phi3flow.embedded import embedded_model_dir
    from phi3serve.contract import ChatRequest, Parameters
    from phi3serve.loop import LoopEngine
    from phi3serve.model import ChatModel

    cfg, _, _ = embedded_run
    params = Parameters(do_sample=False, max_new_tokens=24)
    answers = {}
    for name, folder in (("base", embedded_model_dir()), ("tuned", Path(cfg.output_dir))):
        model = ChatModel.load(folder)
        engine = LoopEngine(model)
        answers[name] = [ask(engine, model, ChatRequest([{"role": "user", "content": q}], params))[0].text for q in QUESTIONS]
    assert answers["base"] != answers["tuned"], answers


class Killed(Exception):
    """Stands in for a run killed mid-way."""


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


class CountSteps(TrainerCallback):
    def __init__(self):
        self.steps: list[int] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


@pytest.mark.model
def test_resume_continues_from_the_last_checkpoint(tmp_path: Path, sample_files) -> None:
    cfg = small_config(tmp_path, sample_files, max_steps=4, save_steps=2, per_device_train_batch_size=2)
    first = train.prepare(cfg)
    first.trainer.add_callback(KillAt(3))
    with pytest.raises(Killed):
        train.train(first)
    checkpoints = Path(cfg.output_dir) / train.CHECKPOINT_DIR
    assert sorted(p.name for p in checkpoints.iterdir()) == ["checkpoint-2"]  # lost: one save interval at most

    second = train.prepare(cfg)
    counter = CountSteps()
    second.trainer.add_callback(counter)
    train.train(second, resume=True)
    assert counter.steps == [3, 4]
    assert second.trainer.state.global_step == 4
