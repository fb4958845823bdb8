"""The reward in use: TRL's GRPOTrainer with a vlrm reward function, normalised rewards from the final model's config."""

import json
import random

import datasets
import numpy as np
import pytest
from safetensors import safe_open
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
from trl import GRPOConfig, GRPOTrainer

from vlrm.data.rows import user_prompt
from vlrm.data.synthetic import draw_shapes
from vlrm.errors import CheckpointError
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.model.reward_model import VLRewardModel
from vlrm.use.export import export_for_vllm, reward_text, weight_names
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import RewardScorer


@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory, save_reward_checkpoint):
    path = tmp_path_factory.mktemp("reward") / "final"
    return save_reward_checkpoint(path, seed=3, reward_mean=0.25, reward_std=2.0)


def _shapes(index):
    return draw_shapes(("red", "blue", "green")[index % 3], 1 + index % 3, 56, random.Random(index))


def test_grpo_trainer_logs_the_rewards_the_scorer_gives(tmp_path, tiny_model_dir, reward_checkpoint):
    question = "What color are the shapes?"
    dataset = datasets.Dataset.from_dict(
        {
            "prompt": [[{"role": "user", "content": question}] for _ in range(4)],
            "image": [_shapes(i) for i in range(4)],
        }
    )
    reward = VLRewardFunction.from_pretrained(reward_checkpoint, device="cpu", batch_size=8)
    calls = []
    original = reward.scorer.score
    reward.scorer.score = lambda rows, *args, **kwargs: calls.append(len(rows)) or original(rows, *args, **kwargs)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), per_device_train_batch_size=4, num_generations=4, max_completion_length=8,
        max_steps=2, learning_rate=1e-5, logging_steps=1, report_to="none", use_cpu=True, bf16=False,
        save_strategy="no", seed=0, log_completions=False,
    )  # fmt: skip
    trainer = GRPOTrainer(
        model=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir),
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=AutoProcessor.from_pretrained(tiny_model_dir),
    )
    trainer.train()
    assert trainer.state.global_step == 2 and calls and all(count == 4 for count in calls)
    logged = list(trainer._logs["rewards"]["vlrm_reward"])
    assert len(logged) == 4 and all(np.isfinite(logged))
    assert any(entry.get("rewards/vlrm_reward/mean") is not None for entry in trainer.state.log_history)
    # The same (image, prompt, completion) scored directly, without the reward function's conversion.
    scorer = RewardScorer.from_pretrained(reward_checkpoint, device="cpu")
    rows = []
    for prompt, completion, images in zip(
        trainer._logs["prompt"], trainer._logs["completion"], trainer._logs["images"], strict=True
    ):
        assert question in json.dumps(prompt, default=str)
        text = completion if isinstance(completion, str) else completion[0]["content"]
        text = text if isinstance(text, str) else "".join(part["text"] for part in text if part["type"] == "text")
        rows.append({"prompt": question, "images": list(images), "response": text})
    np.testing.assert_allclose(logged, scorer.score(rows), rtol=0, atol=1e-5)


def test_reward_function_takes_trl_shapes_and_normalises(reward_checkpoint):
    image = _shapes(0)
    prompt = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Colour?"}]}]
    completions = [[{"role": "assistant", "content": "Red."}], [{"role": "assistant", "content": "Blue."}]]
    raw = VLRewardFunction.from_pretrained(reward_checkpoint, device="cpu")
    from_parts = raw([prompt, prompt], completions)  # images read from the prompt's parts
    from_column = raw([[{"role": "user", "content": "Colour?"}]] * 2, ["Red.", "Blue."], image=[image, image])
    scorer = RewardScorer.from_pretrained(reward_checkpoint, device="cpu")
    direct = scorer.score([{"prompt": "Colour?", "images": [image], "response": text} for text in ("Red.", "Blue.")])
    np.testing.assert_allclose(from_parts, direct, atol=1e-5)
    np.testing.assert_allclose(from_column, direct, atol=1e-5)
    normalised = VLRewardFunction.from_pretrained(reward_checkpoint, normalize=True, device="cpu")
    np.testing.assert_allclose(normalised([prompt, prompt], completions), (direct - 0.25) / 2.0, atol=1e-5)
    assert raw.__name__ == "vlrm_reward"


def test_normalize_needs_recorded_statistics(tmp_path, tiny_model_dir, processor):
    model = VLRewardModel.from_pretrained(tiny_model_dir)
    model.save_pretrained(tmp_path / "plain")
    processor.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="records no reward_mean/reward_std"):
        VLRewardFunction.from_pretrained(tmp_path / "plain", normalize=True, device="cpu")


def test_group_of_completions_shares_one_prompt_node(reward_checkpoint):
    """8 completions of one image prompt: one prompt node, the image through the vision encoder once."""
    scorer = RewardScorer.from_pretrained(reward_checkpoint, device="cpu")
    image = _shapes(1)
    rows = [{"prompt": "How many shapes?", "images": [image], "response": f"There are {n} shapes."} for n in range(8)]
    seen = []
    original = scorer._forward
    scorer._forward = lambda batch: seen.append(batch) or original(batch)
    packed = scorer.score(rows, batch_size=8)
    (batch,) = seen
    assert len(batch["packed_layout"].prompt_spans) == 1 and batch["image_grid_thw"].shape[0] == 1
    padded = RewardScorer.from_pretrained(reward_checkpoint, device="cpu", packing=False).score(rows, batch_size=8)
    np.testing.assert_allclose(packed, padded, rtol=1e-5, atol=1e-5)


def test_export_for_vllm_names_the_architecture_and_keeps_the_weights(tmp_path, reward_checkpoint, processor):
    exported = export_for_vllm(reward_checkpoint, tmp_path / "vllm")
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["Qwen2_5_VLForSequenceClassification"] and config["num_labels"] == 1
    assert config["text_config"]["num_labels"] == 1 and config["problem_type"] == "regression"
    assert config["vlrm"]["reward_token"] == "<|im_end|>" and config["vlrm"]["reward_mean"] == 0.25
    # vLLM's Qwen2.5-VL classifier takes its head from the inner language model: the head is renamed, nothing else.
    names = weight_names(exported)
    assert sorted(names) == sorted(
        "language_model.score.weight" if name == "score.weight" else name for name in weight_names(reward_checkpoint)
    )
    assert not any("lm_head" in n for n in names)
    assert all(
        name.startswith(("model.layers.", "model.embed_tokens", "model.norm", "visual.", "language_model.score."))
        for name in names
    )
    with safe_open(exported / "model.safetensors", "pt") as weights:
        assert weights.get_slice("language_model.score.weight").get_shape() == [
            1,
            config["text_config"]["hidden_size"],
        ]
    # vlrm reads the export back with the same rewards.
    rows = [{"prompt": "Colour?", "images": [_shapes(2)], "response": "Green."}]
    original = RewardScorer.from_pretrained(reward_checkpoint, device="cpu").score(rows)
    np.testing.assert_allclose(RewardScorer.from_pretrained(exported, device="cpu").score(rows), original, atol=1e-6)
    # The text to send ends at <|im_end|>: its tokens are exactly the sequence the scorer reads the reward from.
    text = reward_text(processor, "Colour?", "Green.")
    encoder = PreferenceEncoder(processor)
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert text.endswith("<|im_end|>") and ids[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert ids == encoder.encode_prompt(user_prompt("Colour?", 0), []).input_ids + encoder.encode_response("Green.")


def test_export_refuses_a_model_without_a_score_head(tmp_path, tiny_model_dir):
    with pytest.raises(
        ValueError, match=r"score.weight present: False; generation head weights: \['lm_head.weight'\]"
    ):
        export_for_vllm(tiny_model_dir, tmp_path / "vllm")
    with pytest.raises(CheckpointError):
        export_for_vllm(tmp_path / "missing", tmp_path / "vllm")
