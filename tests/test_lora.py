"""LoRA reward models (vlrm.lora): training through train_rm.py, checkpoints, reload, resume, merge, eval, config.

One LoRA run of the tiny model (4 steps, a checkpoint every 2) serves most tests: adapters of rank 4 on every
language-model linear layer and on the merger (``lora_vision: merger``), the merger at its own learning rate
(``aligner_lr``), with irrelevant queries and the packed layout (the default). The distributed runs (ZeRO-2/3) are
in tests/test_distributed.py.
"""

import json
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open
from transformers import Qwen2_5_VLConfig
from transformers.integrations.deepspeed import unset_hf_deepspeed_config

import vlrm.use.export as export
from tests.test_train import run_train as train_rm_run
from vlrm.data.prepare import load_preference_dataset
from vlrm.errors import CheckpointError, ConfigError
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.packed import make_collator
from vlrm.model.checkpoints import (
    check_loadable,
    find_checkpoints,
    is_lora_checkpoint,
    load_adapter_weights,
    weights_mtime,
)
from vlrm.model.lora import LoraArguments, apply_lora, count_parameters, parameter_groups, reward_model_of
from vlrm.model.reward_model import VLRewardModel
from vlrm.tiny import build_tiny_model_dir
from vlrm.train.config import TrainConfig
from vlrm.train.config_files import load_config
from vlrm.use.scoring import RewardScorer

ROOT = Path(__file__).resolve().parents[1]
PAIR_FIELDS = ("num_pairs", "num_irrelevant", "margin")
RANK, ALPHA, LEARNING_RATE, ALIGNER_LR = 4, 8, 1.0e-3, 3.0e-3
LORA_FLAGS = [
    "--use_lora", "true", "--lora_r", str(RANK), "--lora_alpha", str(ALPHA), "--lora_vision", "merger",
    "--aligner_lr", str(ALIGNER_LR), "--use_irrelevant_queries", "true",
]  # fmt: skip


def run_train(tmp_path, tiny_model_dir, synthetic_dir, *overrides):
    """tests/test_train.py's 4-step run (learning rate LEARNING_RATE), with a smaller reward-statistics sample."""
    return train_rm_run(tmp_path, tiny_model_dir, synthetic_dir, "--reward_stats_samples", "16", *overrides)


def losses(output_dir) -> dict[int, float]:
    state = json.loads((Path(output_dir) / "checkpoint-4" / "trainer_state.json").read_text())
    return {entry["step"]: entry["loss"] for entry in state["log_history"] if "loss" in entry}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, synthetic_dir):
    tmp_path = tmp_path_factory.mktemp("lora")
    return tmp_path, run_train(tmp_path, tiny_model_dir, synthetic_dir, *LORA_FLAGS)


@pytest.fixture(scope="module")
def eval_batches(encoder, synthetic_dir):
    """Six held-out pairs in both layouts, for comparing rewards."""
    rows, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=6)
    batches = []
    for packing in (True, False):
        batch = make_collator(encoder, packing)(list(rows))
        batches.append({key: value for key, value in batch.items() if key not in PAIR_FIELDS})
    return batches


def rewards(model, batches) -> torch.Tensor:
    model.eval()
    enable_packed_attention(model)
    with torch.no_grad():
        return torch.cat([model(**batch).rewards for batch in batches])


def lora_parameter_count(config: Qwen2_5_VLConfig, rank: int, merger: bool = True) -> int:
    """Adapter parameters by hand: an adapted [out, in] weight gets A [r, in] and B [out, r]."""
    text, vision = config.text_config, config.vision_config
    hidden, intermediate = text.hidden_size, text.intermediate_size
    kv_width = text.num_key_value_heads * (hidden // text.num_attention_heads)
    per_layer = (
        (hidden + hidden)  # q_proj
        + 2 * (hidden + kv_width)  # k_proj, v_proj
        + (hidden + hidden)  # o_proj
        + 2 * (hidden + intermediate)  # gate_proj, up_proj
        + (intermediate + hidden)  # down_proj
    )
    total = text.num_hidden_layers * per_layer
    if merger:  # mlp.0: [merged, merged], mlp.2: [out_hidden, merged]; merged = hidden x spatial_merge_size^2
        merged = vision.hidden_size * vision.spatial_merge_size**2
        total += (merged + merged) + (merged + vision.out_hidden_size)
    return rank * total


# ----------------------------------------------------------------------------------------------------------------
# What trains


def test_trainable_parameters_are_what_the_config_implies(lora_run, tiny_model_dir):
    tmp_path, run = lora_run
    config = Qwen2_5_VLConfig.from_pretrained(tiny_model_dir)
    adapters = lora_parameter_count(config, RANK)
    expected = adapters + config.text_config.hidden_size  # + the score head, [1, hidden], trained in full
    assert count_parameters(run["model"])[0] == expected
    (log_file,) = (tmp_path / "logs").glob("train_*.log")
    logged = re.search(
        r"model: .*?, ([\d,]+) trainable of ([\d,]+) parameters.*?: ([\d,]+) adapter", log_file.read_text()
    )
    assert logged, "the trainable parameter count is logged"
    assert int(logged[1].replace(",", "")) == expected and int(logged[3].replace(",", "")) == adapters
    base_total = sum(p.numel() for p in VLRewardModel.from_pretrained(tiny_model_dir).parameters())
    # The total counts the frozen original head next to its trained copy.
    assert int(logged[2].replace(",", "")) == base_total + expected


def test_only_the_adapters_and_the_head_change(lora_run, tiny_model_dir):
    _, run = lora_run
    base = VLRewardModel.from_pretrained(tiny_model_dir).state_dict()
    trained = reward_model_of(run["model"]).state_dict()
    adapter_names = [name for name in trained if ".lora_" in name]
    for name, value in trained.items():
        if ".lora_" in name or name.startswith("score."):
            continue
        original = name.replace(".base_layer.", ".")
        assert torch.equal(value, base[original]), f"{original} changed"
    # LoRA B starts at zero: a B that is nonzero now was trained; where the adapters are is what the config says.
    trained_b = {name.split(".lora_B")[0] for name in adapter_names if ".lora_B." in name and trained[name].any()}
    assert any(name.startswith("model.language_model.layers.") for name in trained_b)
    assert {name for name in trained_b if ".visual." in name} == {
        "model.visual.merger.mlp.0",
        "model.visual.merger.mlp.2",
    }
    assert not any(".visual.blocks." in name or ".patch_embed." in name for name in adapter_names)
    assert not torch.equal(trained["score.modules_to_save.default.weight"], trained["score.original_module.weight"])
    frozen = [name for name, p in run["model"].named_parameters() if ".visual." in name and ".lora_" not in name]
    assert frozen and not any(p.requires_grad for name, p in run["model"].named_parameters() if name in frozen)


def test_the_merger_learning_rate_reaches_its_optimizer_group(lora_run):
    _, run = lora_run
    model, optimizer = run["model"], run["trainer"].optimizer
    names = {id(p): name for name, p in model.named_parameters()}
    groups = {group["name"]: group for group in optimizer.param_groups}
    # Adapters and the head are all weight-decay parameters (no biases, no norms): one group per part.
    assert {name: group["initial_lr"] for name, group in groups.items()} == {
        "rest": LEARNING_RATE,
        "merger": ALIGNER_LR,
    }
    merger = {names[id(p)] for name, group in groups.items() if name.startswith("merger") for p in group["params"]}
    assert merger and all(".visual.merger." in name and ".lora_" in name for name in merger)
    rest = {names[id(p)] for name, group in groups.items() if name.startswith("rest") for p in group["params"]}
    assert "base_model.model.score.modules_to_save.default.weight" in rest
    assert len(merger) + len(rest) == sum(p.requires_grad for p in model.parameters())  # every trained tensor once
    first_step = next(entry for entry in run["trainer"].state.log_history if "learning_rate" in entry)
    assert first_step["learning_rate"] <= LEARNING_RATE  # the logged rate is the main group's


def test_parameter_groups_without_lora_split_vision_merger_and_the_rest(tiny_model_dir):
    model = VLRewardModel.from_pretrained(tiny_model_dir)
    groups = {group["name"]: group for group in parameter_groups(model, 1e-4, 0.0, [], vit_lr=1e-6, aligner_lr=1e-5)}
    rates = {name: group["lr"] for name, group in groups.items()}
    assert rates == {"rest (no decay)": 1e-4, "vision (no decay)": 1e-6, "merger (no decay)": 1e-5}
    visual = model.model.visual
    assert {id(p) for p in groups["merger (no decay)"]["params"]} == {id(p) for p in visual.merger.parameters()}
    vision_ids = {id(p) for p in visual.parameters()} - {id(p) for p in visual.merger.parameters()}
    assert {id(p) for p in groups["vision (no decay)"]["params"]} == vision_ids
    model.freeze_vision_tower()  # frozen parameters are in no group
    assert "vision (no decay)" not in {group["name"] for group in parameter_groups(model, 1e-4, 0.0, [], 1e-6)}


def test_target_modules_choose_the_language_model_layers(tiny_model_dir):
    model = VLRewardModel.from_pretrained(tiny_model_dir)
    text = model.config.text_config
    kv_width = text.num_key_value_heads * (text.hidden_size // text.num_attention_heads)
    config = LoraArguments(use_lora=True, lora_r=2, lora_target_modules=["q_proj", "v_proj"])
    peft_model = apply_lora(model, config)
    per_layer = (text.hidden_size + text.hidden_size) + (text.hidden_size + kv_width)
    assert count_parameters(peft_model)[0] == 2 * text.num_hidden_layers * per_layer + text.hidden_size
    with pytest.raises(ValueError, match=r"\['qproj'\] match no linear layer.*'q_proj'"):
        apply_lora(VLRewardModel.from_pretrained(tiny_model_dir), LoraArguments(lora_target_modules=["qproj"]))


def test_the_adapter_records_the_base_model_s_absolute_path(tiny_model_dir, monkeypatch):
    # A run started from a relative path must be loadable from any working dir.
    monkeypatch.chdir(Path(tiny_model_dir).parent)
    model = apply_lora(VLRewardModel.from_pretrained(Path(tiny_model_dir).name), LoraArguments(use_lora=True))
    assert model.peft_config["default"].base_model_name_or_path == str(Path(tiny_model_dir).resolve())


# ----------------------------------------------------------------------------------------------------------------
# Packed layout and gradient checkpointing through the peft wrapper


@pytest.mark.parametrize("use_reentrant", [False, True])  # ZeRO-3 + LoRA runs reentrant (TRL forces it)
def test_packed_layout_and_gradient_checkpointing_give_the_padded_gradients(
    tiny_model_dir, eval_batches, use_reentrant
):
    def lora_gradients(packed: bool, checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = apply_lora(VLRewardModel.from_pretrained(tiny_model_dir), LoraArguments(use_lora=True, lora_r=4))
        enable_packed_attention(model)  # through the wrapper: the language model's attention modules switch
        assert model.get_base_model().config.text_config._attn_implementation == "vlrm_packed_sdpa"
        with torch.no_grad():  # B = 0 at the start would give A no gradient: make the adapters do something
            for name, parameter in model.named_parameters():
                if ".lora_B." in name:
                    parameter.normal_(std=0.1)
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()  # what TRL's RewardTrainer does for a peft model
        model.train()
        output = model(**eval_batches[0 if packed else 1]).rewards
        output.sum().backward()
        return output.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    reference_rewards, reference = lora_gradients(packed=False, checkpointing=False)
    for packed, checkpointing in ((True, False), (True, True), (False, True)):
        got_rewards, got = lora_gradients(packed, checkpointing)
        torch.testing.assert_close(got_rewards, reference_rewards, rtol=1e-5, atol=1e-5)
        assert got.keys() == reference.keys()
        for name, gradient in got.items():
            assert gradient is not None and gradient.abs().max() > 0, f"{name}: no gradient"
            scale = reference[name].abs().max()
            torch.testing.assert_close(gradient, reference[name], rtol=1e-5, atol=1e-5 * scale, msg=name)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: save, reload, resume, merge, evaluate


def test_checkpoint_holds_the_adapter_the_head_the_config_and_the_processor(lora_run, tiny_model_dir):
    tmp_path, _ = lora_run
    checkpoint = tmp_path / "out" / "checkpoint-4"
    names = {path.name for path in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "config.json", "processor_config.json"} <= names
    assert not {"model.safetensors", "pytorch_model.bin"} & names, "no base weights in a LoRA checkpoint"
    with safe_open(checkpoint / "adapter_model.safetensors", "pt") as weights:
        keys = list(weights.keys())
    assert "base_model.model.score.weight" in keys
    assert all(".lora_A." in key or ".lora_B." in key for key in keys if key != "base_model.model.score.weight")
    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert adapter_config["vlrm"]["format"] == "vlrm-lora-reward-model"
    assert adapter_config["vlrm"]["base_model_name_or_path"] == str(Path(tiny_model_dir).resolve())
    assert adapter_config["modules_to_save"] == ["score"] and adapter_config["r"] == RANK
    assert json.loads((checkpoint / "config.json").read_text())["architectures"] == ["Qwen2_5_VLRewardModel"]
    check_loadable(checkpoint)
    assert is_lora_checkpoint(checkpoint)
    assert weights_mtime(checkpoint) == (checkpoint / "adapter_model.safetensors").stat().st_mtime
    found = find_checkpoints(tmp_path / "out")
    assert [checkpoint.name for checkpoint in found] == ["checkpoint-2", "checkpoint-4", "final"]
    assert found[-1].step == 4
    final_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert final_config["reward_stats_source"].startswith("training set: 16 pairs")


def test_adapter_checkpoint_reloads_with_identical_rewards(lora_run, eval_batches):
    tmp_path, run = lora_run
    checkpoint = tmp_path / "out" / "checkpoint-4"
    in_training = rewards(run["model"], eval_batches)
    scorer = RewardScorer.from_pretrained(checkpoint, device="cpu")
    torch.testing.assert_close(rewards(scorer.model, eval_batches), in_training, rtol=0, atol=1e-6)
    merged = VLRewardModel.from_pretrained(checkpoint)  # a plain VLRewardModel, the adapters folded in
    assert type(merged).__name__ == "Qwen2_5_VLRewardModel" and isinstance(merged, VLRewardModel)
    torch.testing.assert_close(rewards(merged, eval_batches), in_training, rtol=0, atol=1e-5)
    final = RewardScorer.from_pretrained(tmp_path / "out", device="cpu")
    assert final.reward_mean is not None and final.reward_std > 0  # the final model's reward statistics load


def test_merged_export_is_a_full_checkpoint_with_the_adapter_s_rewards(lora_run, eval_batches):
    tmp_path, _ = lora_run
    checkpoint, merged_dir = tmp_path / "out" / "checkpoint-4", tmp_path / "merged"
    assert export.main(["--merge", str(checkpoint), str(merged_dir)]) == 0
    names = {path.name for path in merged_dir.iterdir()}
    assert "model.safetensors" in names and "processor_config.json" in names and "adapter_config.json" not in names
    adapter_rewards = rewards(RewardScorer.from_pretrained(checkpoint, device="cpu").model, eval_batches)
    merged = RewardScorer.from_pretrained(merged_dir, device="cpu")
    assert isinstance(merged.model, VLRewardModel) and not hasattr(merged.model, "peft_config")
    torch.testing.assert_close(rewards(merged.model, eval_batches), adapter_rewards, rtol=0, atol=1e-5)
    # The merged checkpoint is an ordinary one: the vLLM export takes it; the adapter dir itself is refused.
    vllm_dir = export.export_for_vllm(merged_dir, tmp_path / "vllm")
    assert "language_model.score.weight" in export.weight_names(vllm_dir)  # where vLLM's Qwen2.5-VL loader reads it
    with pytest.raises(ValueError, match="merge it first"):
        export.export_for_vllm(checkpoint, tmp_path / "vllm-adapter")


def test_resume_from_a_lora_checkpoint_continues_with_the_same_losses(
    lora_run, tmp_path, tiny_model_dir, synthetic_dir, eval_batches
):
    first_dir, run = lora_run
    uninterrupted = losses(first_dir / "out")
    assert sorted(uninterrupted) == [1, 2, 3, 4] and abs(uninterrupted[4] - uninterrupted[1]) > 1e-3
    checkpoint = first_dir / "out" / "checkpoint-2"
    resumed_run = run_train(
        tmp_path, tiny_model_dir, synthetic_dir, *LORA_FLAGS, "--resume_from_checkpoint", str(checkpoint)
    )
    resumed = losses(tmp_path / "out")
    for step in (3, 4):
        assert resumed[step] == pytest.approx(uninterrupted[step], rel=1e-5), step
    torch.testing.assert_close(
        rewards(resumed_run["model"], eval_batches), rewards(run["model"], eval_batches), rtol=0, atol=1e-5
    )


def test_resume_refuses_other_lora_settings(lora_run, tiny_model_dir):
    tmp_path, _ = lora_run
    checkpoint = tmp_path / "out" / "checkpoint-2"
    other_rank = apply_lora(VLRewardModel.from_pretrained(tiny_model_dir), LoraArguments(use_lora=True, lora_r=8))
    with pytest.raises(ValueError, match="trained with r=4, this model has r=8"):
        load_adapter_weights(other_rank, checkpoint)
    no_merger = LoraArguments(use_lora=True, lora_r=RANK, lora_alpha=ALPHA)  # lora_vision none: fewer adapters
    with pytest.raises(ValueError, match=r"unexpected \['base_model.model.model.visual.merger"):
        load_adapter_weights(apply_lora(VLRewardModel.from_pretrained(tiny_model_dir), no_merger), checkpoint)


def test_base_model_path_is_used_when_the_recorded_base_is_gone(lora_run, tmp_path, tiny_model_dir, eval_batches):
    run_dir, _ = lora_run
    moved = tmp_path / "checkpoint-4"
    shutil.copytree(run_dir / "out" / "checkpoint-4", moved)
    adapter_config = json.loads((moved / "adapter_config.json").read_text())
    adapter_config["vlrm"]["base_model_name_or_path"] = str(tmp_path / "gone" / "tiny-qwen2.5-vl")
    (moved / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(CheckpointError, match="not found here; set base_model_path"):
        RewardScorer.from_pretrained(moved)
    scorer = RewardScorer.from_pretrained(moved, base_model_path=tiny_model_dir, device="cpu")
    expected = rewards(
        RewardScorer.from_pretrained(run_dir / "out" / "checkpoint-4", device="cpu").model, eval_batches
    )
    torch.testing.assert_close(rewards(scorer.model, eval_batches), expected, rtol=0, atol=0)
    # A base of other shapes is refused before any weight is read.
    build_tiny_model_dir(tmp_path / "other-base", num_layers=1)
    with pytest.raises(CheckpointError, match="not the one this adapter was trained on.*num_hidden_layers 1"):
        RewardScorer.from_pretrained(moved, base_model_path=tmp_path / "other-base")


def test_eval_sweeps_lora_checkpoints(lora_run, tmp_path, eval_rm, synthetic_dir, tiny_model_dir):
    run_dir, _ = lora_run
    config = tmp_path / "eval.yaml"
    values = {
        "model_dirs": [str(run_dir / "out")],
        "dataset_path": str(synthetic_dir / "eval.jsonl"),
        "base_model_path": str(tiny_model_dir),
        "max_eval_samples": 8,
        "results_dir": str(tmp_path / "results"),
        "log_dir": str(tmp_path / "logs"),
    }
    config.write_text(json.dumps(values))
    assert eval_rm.main([str(config)]) == 0
    results = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")
    assert results["checkpoint"].tolist() == ["checkpoint-2", "checkpoint-4", "final"]
    assert (results["status"] == "ok").all() and results["weights_mtime"].notna().all()
    assert np.isfinite(results["accuracy"]).all()


def test_a_lora_sweep_loads_the_base_once_and_scores_as_fresh_loads(
    lora_run, tmp_path, eval_rm, synthetic_dir, tiny_model_dir, monkeypatch
):
    """Three adapter checkpoints of one run: the base model is loaded once and each checkpoint's adapters and head are
    swapped in (vlrm.model.loading.load_checkpoint's reuse); every per-pair score equals that of a fresh load."""
    import vlrm.model.loading as loading

    run_dir, _ = lora_run
    base_loads = []
    real_load = loading.load_lora_reward_model
    monkeypatch.setattr(
        loading, "load_lora_reward_model", lambda *a, **k: base_loads.append(a[0]) or real_load(*a, **k)
    )
    values = {
        "model_dirs": [str(run_dir / "out")], "dataset_path": str(synthetic_dir / "eval.jsonl"), "max_eval_samples": 8,
        "results_dir": str(tmp_path / "results"), "log_dir": str(tmp_path / "logs"), "num_irrelevant_pairs": 0,
    }  # fmt: skip
    (tmp_path / "eval.yaml").write_text(json.dumps(values))
    assert eval_rm.main([str(tmp_path / "eval.yaml")]) == 0
    assert len(base_loads) == 1, f"the base model was loaded {len(base_loads)} times for 3 adapter checkpoints"
    results = pd.read_csv(tmp_path / "results" / "evaluation_results.csv")
    assert results["checkpoint"].tolist() == ["checkpoint-2", "checkpoint-4", "final"]
    rows, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=8, seed=42)
    monkeypatch.setattr(loading, "load_lora_reward_model", real_load)
    first_scores = []
    for result in results.itertuples():
        swept = pd.read_csv(result.pairs_file)
        fresh = RewardScorer.from_pretrained(result.checkpoint_path).score_pairs(rows, batch_size=8)
        np.testing.assert_array_equal(swept["chosen_score"].to_numpy(np.float32), fresh.chosen)
        np.testing.assert_array_equal(swept["rejected_score"].to_numpy(np.float32), fresh.rejected)
        first_scores.append(float(fresh.chosen[0]))
    # The 4-step run's final model is its checkpoint-4; checkpoint-2 must score otherwise (its own adapters loaded).
    assert first_scores[0] != first_scores[1] and first_scores[1] == first_scores[2]


# ----------------------------------------------------------------------------------------------------------------
# Config: what cannot work raises before any weight is loaded; what does nothing warns


def write_train_config(tmp_path, tiny_model_dir, synthetic_dir, **values):
    path = tmp_path / "config.json"  # JSON: YAML would read json.dumps' 1e-05 as a string
    base = {
        "model_name_or_path": str(tiny_model_dir),
        "dataset_path": str(synthetic_dir / "train.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "bf16": False,
        "report_to": "none",
    }
    path.write_text(json.dumps(base | values))
    return path


@pytest.mark.parametrize(
    "values, message",
    [
        ({"use_lora": True, "freeze_vit": True, "lora_vision": "all"}, "freeze_vit: true freezes the vision blocks"),
        ({"use_lora": True, "lora_r": 0}, "lora_r must be at least 1"),
        ({"use_lora": True, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"use_lora": True, "lora_vision": "blocks"}, "`lora_vision` must be one of 'none', 'merger', 'all'"),
        ({"aligner_lr": -1.0}, "aligner_lr must be positive"),
        (
            {
                "use_lora": True, "lora_vision": "merger", "aligner_lr": 1e-4,
                "deepspeed": {
                    "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}, "zero_optimization": {"stage": 2},
                },
            },
            "DeepSpeed config has an `optimizer` block",
        ),
    ],
)  # fmt: skip
def test_impossible_lora_settings_raise(tmp_path, tiny_model_dir, synthetic_dir, values, message):
    path = write_train_config(tmp_path, tiny_model_dir, synthetic_dir, **values)
    try:
        with pytest.raises(ConfigError, match=message):
            load_config(TrainConfig, path)
    finally:
        unset_hf_deepspeed_config()


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lora_r": 8}, "lora_r set but use_lora is false"),
        ({"use_lora": True, "lora_dropout": 0.1}, "lora_dropout=0.1 has no effect: disable_dropout"),
        ({"use_lora": True, "vit_lr": 1e-5}, "vit_lr has no effect"),
        ({"freeze_vit": True, "vit_lr": 1e-5}, r"vit_lr has no effect.*freeze_vit: true"),
        ({"use_lora": True, "aligner_lr": 1e-5}, "aligner_lr has no effect"),
    ],
)
def test_lora_settings_that_do_nothing_warn(tmp_path, tiny_model_dir, synthetic_dir, values, message):
    with pytest.warns(UserWarning, match=message):
        load_config(TrainConfig, write_train_config(tmp_path, tiny_model_dir, synthetic_dir, **values))


def test_sensible_lora_settings_are_silent(tmp_path, tiny_model_dir, synthetic_dir):
    path = write_train_config(
        tmp_path, tiny_model_dir, synthetic_dir, use_lora=True, lora_vision="all", vit_lr=1e-5, aligner_lr=1e-4
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*(lora|vit_lr|aligner_lr).*")
        config = load_config(TrainConfig, path, ["--lora_target_modules", "q_proj", "v_proj"])
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.lora_vision == "all"


def test_a_plain_peft_adapter_is_not_taken_for_a_reward_model(lora_run, tmp_path):
    run_dir, _ = lora_run
    plain = tmp_path / "plain-adapter"
    shutil.copytree(run_dir / "out" / "checkpoint-4", plain)
    adapter_config = json.loads((plain / "adapter_config.json").read_text())
    del adapter_config["vlrm"]
    (plain / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(CheckpointError, match="LoRA adapter only, not one vlrm saved"):
        check_loadable(plain)
