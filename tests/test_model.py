import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration, set_seed

from vlrm.data.prepare import load_preference_dataset
from vlrm.layout.padded import PaddedPreferenceCollator, split_rewards
from vlrm.model.reward_model import VLRewardModel, last_token_index


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    set_seed(0)
    return VLRewardModel.from_pretrained(tiny_model_dir).eval()


def _inputs(batch):
    return {key: value for key, value in batch.items() if key not in ("num_pairs", "num_irrelevant", "margin")}


def test_last_token_index_for_right_left_and_no_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert last_token_index(mask).tolist() == [2, 4, 4]


def test_reward_is_read_at_last_real_token_whatever_the_padding(model, encoder):
    ids = encoder.tokenizer("<|im_start|>user\nHello there<|im_end|>\n", add_special_tokens=False)["input_ids"]
    length = len(ids)
    with torch.no_grad():
        alone = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, length, dtype=torch.long)).rewards
        for pad_id in (encoder.pad_token_id, encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")):  # pad == eos too
            pad = torch.full((3,), pad_id)
            right = torch.cat([torch.tensor(ids), pad])[None]
            right_mask = torch.cat([torch.ones(length), torch.zeros(3)]).long()[None]
            left = torch.cat([pad, torch.tensor(ids)])[None]
            left_mask = torch.cat([torch.zeros(3), torch.ones(length)]).long()[None]
            # Left padding needs positions that start at the first real token, as generation code passes them.
            left_positions = (left_mask.cumsum(-1) - 1).clamp(min=0)
            right_reward = model(input_ids=right, attention_mask=right_mask).rewards
            left_reward = model(input_ids=left, attention_mask=left_mask, position_ids=left_positions).rewards
            torch.testing.assert_close(right_reward, alone, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(left_reward, alone, rtol=1e-5, atol=1e-5)


def test_batched_padded_rewards_equal_one_pair_at_a_time(model, encoder, synthetic_dir):
    dataset, _ = load_preference_dataset(synthetic_dir / "train.jsonl", max_samples=3)
    rows = list(dataset)
    rows[1] = dict(rows[1], chosen="A much longer answer than the others, to force padding in this batch.")
    collator = PaddedPreferenceCollator(encoder)
    with torch.no_grad():
        batch = collator(rows)
        chosen, rejected, _ = split_rewards(model(**_inputs(batch)).rewards, 3)
        for index, row in enumerate(rows):
            single_chosen, single_rejected, _ = split_rewards(model(**_inputs(collator([row]))).rewards, 1)
            torch.testing.assert_close(chosen[index : index + 1], single_chosen, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(rejected[index : index + 1], single_rejected, rtol=1e-5, atol=1e-5)


def test_plain_vlm_checkpoint_loads_without_lm_head_and_seeded_head(tiny_model_dir):
    base = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir)
    set_seed(1)
    first = VLRewardModel.from_pretrained(tiny_model_dir)
    set_seed(1)
    second = VLRewardModel.from_pretrained(tiny_model_dir)
    assert not hasattr(first, "lm_head") and first.config.num_labels == 1
    torch.testing.assert_close(first.score.weight, second.score.weight)
    torch.testing.assert_close(first.model.visual.patch_embed.proj.weight, base.model.visual.patch_embed.proj.weight)
    torch.testing.assert_close(first.model.language_model.norm.weight, base.model.language_model.norm.weight)


def test_save_and_reload_gives_identical_rewards(model, encoder, synthetic_dir, tmp_path):
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=4)
    batch = _inputs(PaddedPreferenceCollator(encoder)(list(dataset)))
    model.save_pretrained(tmp_path / "reward")
    reloaded = VLRewardModel.from_pretrained(tmp_path / "reward").eval()
    assert reloaded.config.architectures == ["Qwen2_5_VLRewardModel"]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).rewards, model(**batch).rewards, rtol=0, atol=0)


def test_freeze_vision_tower_keeps_merger_trainable(tiny_model_dir):
    model = VLRewardModel.from_pretrained(tiny_model_dir)
    model.freeze_vision_tower()
    visual = model.model.visual
    assert not any(p.requires_grad for p in visual.patch_embed.parameters())
    assert not any(p.requires_grad for p in visual.blocks.parameters())
    assert all(p.requires_grad for p in visual.merger.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())
