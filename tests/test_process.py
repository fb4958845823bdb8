"""Process rewards: step rows in every layout, a score at each step's end, packed = padded with 4 solutions per
question, the step loss, aggregations, and bad step rows named by file, row and field."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor, set_seed

from tests.test_packing import _assert_close, _image, _text
from vlrm.data.prepare import load_preference_dataset
from vlrm.data.rows import map_row
from vlrm.errors import BadSampleError
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder, check_step_separator
from vlrm.layout.steps import StepCollator, aggregate_steps, step_labels
from vlrm.model.reward_model import VLRewardModel
from vlrm.train.objectives import step_loss

LABEL_FIELDS = ("num_pairs", "num_irrelevant", "margin", "step_labels")


def _step_row(seed: int, num_images: int, solutions: list[tuple[int, list]]) -> dict:
    """A question with ``solutions``: (number of steps, labels) each; steps of seeded words."""
    images = [_image(seed * 10 + index, (56, 56)) for index in range(num_images)]
    content = [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": _text(seed, 5)}]
    steps = [[_text(seed * 100 + 10 * number + step, 3 + step) for step in range(count)]
             for number, (count, _) in enumerate(solutions)]  # fmt: skip
    return {"prompt": [{"role": "user", "content": content}], "images": images, "steps": steps,
            "step_labels": [labels for _, labels in solutions]}  # fmt: skip


def _rows() -> list[dict]:
    """4 solutions of one question (hard labels, a neutral step), 2 of another with soft labels, a text-only one."""
    return [
        _step_row(1, 1, [(3, [1, 1, 0]), (2, [1, 1]), (4, [1, 0, 0, 0]), (3, [1, math.nan, 1])]),
        _step_row(2, 2, [(2, [0.75, 0.25]), (3, [1.0, 0.5, 0.0])]),
        _step_row(3, 0, [(2, [1, 0])]),
    ]


def _outputs(model, batch):
    return model(**{key: value for key, value in batch.items() if key not in LABEL_FIELDS})


@pytest.mark.parametrize("name", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_packed_step_scores_and_gradients_equal_padded(name, pooling, family_dirs):
    """Every step's score and every parameter's gradient (1e-5 relative), 4 solutions under one prompt node."""
    set_seed(0)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(family_dirs(name))
    config.reward_pooling = pooling
    model = VLRewardModel.from_pretrained(family_dirs(name), config=config, dtype=torch.float32)
    assert model.reward_pooling == pooling  # mean pooling reads each step's own tokens (response_index per step)
    enable_packed_attention(model)
    model.train()
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(family_dirs(name)))
    rows = _rows()
    results = {}
    for layout, packing in (("padded", False), ("packed", True)):
        batch = StepCollator(encoder, packing)(rows)
        model.zero_grad(set_to_none=True)
        rewards = _outputs(model, batch).rewards
        loss, _ = step_loss(rewards, batch["step_labels"])
        loss.backward()
        grads = {key: value.grad.clone() for key, value in model.named_parameters() if value.grad is not None}
        results[layout] = (rewards.detach(), grads, batch)
    (padded, padded_grads, padded_batch), (packed, packed_grads, packed_batch) = results["padded"], results["packed"]
    assert packed.shape == (3 + 2 + 4 + 3 + 2 + 3 + 2,)  # one score per step
    _assert_close(packed, padded, "step scores")
    assert packed_grads.keys() == padded_grads.keys()
    for key, grad in padded_grads.items():
        _assert_close(packed_grads[key], grad, key)
    layout = packed_batch["packed_layout"]
    assert len(layout.prompt_spans) == 3 and [len(spans) for spans in layout.branch_spans] == [4, 2, 1]
    assert packed_batch["image_grid_thw"].shape[0] == 3  # each image through the vision tower once
    assert padded_batch["input_ids"].shape[0] == 7  # the padded layout: one row per solution


def test_step_scores_are_read_at_each_steps_end(tiny_model_dir):
    """A step's score depends on that step and the ones before it, never on the steps after it."""
    set_seed(0)
    model = VLRewardModel.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    enable_packed_attention(model)
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(tiny_model_dir))
    row = _step_row(4, 1, [(3, [1, 1, 1])])
    changed = json.loads(json.dumps({key: row[key] for key in ("steps", "step_labels")}))
    changed["steps"][0][2] = "Something else entirely."
    with torch.no_grad():
        first = _outputs(model, StepCollator(encoder)([row])).rewards
        second = _outputs(model, StepCollator(encoder)([row | changed])).rewards
    assert torch.equal(first[:2], second[:2]) and not torch.allclose(first[2], second[2])
    ids, ends = encoder.encode_steps(row["steps"][0])
    tokenizer = encoder.tokenizer
    assert tokenizer.decode(ids[ends[-1]]) == encoder.end_of_turn  # the last step ends where an outcome reward does
    assert all(tokenizer.decode(ids[: end + 1]).endswith("\n\n") for end in ends[:-1])


def test_step_loss_leaves_neutral_steps_out_and_can_keep_last_steps_only():
    rows = _rows()
    labels = step_labels(rows)
    rewards = torch.linspace(-2, 2, len(labels.labels))
    loss, parts = step_loss(rewards, labels)
    known = ~torch.isnan(labels.labels)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(rewards[known], labels.labels[known])
    assert loss.item() == pytest.approx(expected.item())
    hard = known & (labels.labels != 0.5)
    assert len(parts["step_correct"]) == int(hard.sum())
    last_loss, _ = step_loss(rewards, labels, last_only=True)
    last = known & labels.last
    assert last_loss.item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(rewards[last], labels.labels[last]).item()
    )
    assert labels.row.tolist() == [0, 0, 0, 0, 1, 1, 2] and labels.num_steps.tolist() == [3, 2, 4, 3, 2, 3, 2]


def test_aggregations():
    probabilities = torch.tensor([0.9, 0.5, 0.2, 0.8, 0.6])
    solution = torch.tensor([0, 0, 0, 1, 1])
    assert aggregate_steps(probabilities, solution, 2, "mean").tolist() == pytest.approx([1.6 / 3, 0.7])
    assert aggregate_steps(probabilities, solution, 2, "min").tolist() == pytest.approx([0.2, 0.6])
    assert aggregate_steps(probabilities, solution, 2, "last").tolist() == pytest.approx([0.2, 0.6])
    assert aggregate_steps(probabilities, solution, 2, "product").tolist() == pytest.approx([0.09, 0.48])
    with pytest.raises(ValueError, match="step_aggregation 'max'"):
        aggregate_steps(probabilities, solution, 2, "max")


def test_step_layouts_map_onto_the_canonical_step_row():
    generic = map_row({"question": "Q?", "steps": ["a", "b"], "step_labels": [True, "-"]})
    assert generic["steps"] == [["a", "b"]] and generic["step_labels"] == [[1.0, 0.0]]
    soft = map_row({"question": "Q?", "steps_with_score": [{"step": "a", "score": 0.75}, {"step": "b", "score": 0}]})
    assert soft["step_labels"] == [[0.75, 0.0]]
    bench = map_row({"image": [], "question": "Q?", "answer": "2", "data_source": "MathVision",
                     "response": {"steps": ["a", "b", "c"], "process_correctness": [1, 0, -1]}})  # fmt: skip
    assert (
        bench["step_labels"][0][0] == 1.0
        and math.isnan(bench["step_labels"][0][1])
        and bench["step_labels"][0][2] == 0
    )
    assert bench["category"] == "MathVision"
    chat = map_row({"image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?\n\nFirst."}, {"from": "gpt", "value": "+"},
        {"from": "human", "value": "Second."}, {"from": "gpt", "value": "-"}]})  # fmt: skip
    assert chat["steps"] == [["First.", "Second."]] and chat["step_labels"] == [[1.0, 0.0]]
    assert [part["type"] for part in chat["prompt"][0]["content"]] == ["image", "text"]
    several = map_row({"question": "Q?", "solutions": [{"steps": ["x"], "step_labels": [0]},
                                                       {"steps": ["y", "z"], "step_labels": [1, 1]}]})  # fmt: skip
    assert several["chosen"] == "y\n\nz" and several["rejected"] == "x" and len(several["responses"]) == 2


@pytest.mark.parametrize(
    ("row", "field", "reason"),
    [
        ({"steps": ["a", "b"], "step_labels": [1]}, "step_labels", "1 labels for 2 steps"),
        ({"steps": ["a", " "], "step_labels": [1, 1]}, "steps", "step 1 is empty"),
        ({"steps": [], "step_labels": []}, "steps", "a solution has no step"),
        ({"steps": ["a"], "step_labels": [2.5]}, "step_labels", "in \\[0, 1\\]"),
        ({"steps": ["a"], "step_labels": ["maybe"]}, "step_labels", "unknown step label"),
        ({"solutions": [{"steps": ["a"], "step_labels": [1, 0]}]}, "solutions\\[0\\].step_labels", "2 labels for 1"),
        ({"response": {"steps": ["a"], "process_correctness": [3]}}, "response.process_correctness", "1, 0 or -1"),
    ],
)
def test_bad_step_rows_name_file_row_and_field(tmp_path, row, field, reason):
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"question": "Q?", "steps": ["ok"], "step_labels": [1]}) + "\n"
                    + json.dumps({"question": "Q?"} | row) + "\n")  # fmt: skip
    with pytest.raises(BadSampleError, match=rf"steps\.jsonl: row 1: field `{field}`: .*{reason}"):
        load_preference_dataset(path)


def test_step_lengths_and_the_separator_check(tmp_path, tiny_model_dir):
    encoder = PreferenceEncoder(AutoProcessor.from_pretrained(tiny_model_dir))
    Image.new("RGB", (56, 56), (10, 200, 10)).save(tmp_path / "green.png")
    path = tmp_path / "steps.jsonl"
    path.write_text(json.dumps({"question": "Q?", "images": ["green.png"], "solutions": [
        {"steps": ["One.", "Two."], "step_labels": [1, 0]}, {"steps": ["Three."], "step_labels": [1]}]}) + "\n")  # fmt: skip
    dataset, _ = load_preference_dataset(path, encoder=encoder)
    row = dataset[0]
    assert row["response_lengths"] == [len(encoder.encode_steps(steps)[0]) for steps in row["steps"]]
    batch = StepCollator(encoder)([row])
    assert batch["input_ids"].shape[1] == row["prompt_length"] + sum(row["response_lengths"])
    check_step_separator(encoder.processor, "\n\n", encoder.end_of_turn)
    with pytest.raises(ValueError, match="holds the end-of-turn token"):
        check_step_separator(encoder.processor, "<|im_end|>", encoder.end_of_turn)
    with pytest.raises(ValueError, match="is empty"):
        check_step_separator(encoder.processor, "", encoder.end_of_turn)


def test_process_training_from_the_cli_with_lora_reloads_its_step_scores(
    tmp_path, tiny_model_dir, synthetic_dir, save_reward_checkpoint
):
    """train_rm.py with reward_type process and LoRA adapters: the loss falls, the checkpoint records the process
    settings, and the scorer reloads it (base + adapters) with the step scores of the final model."""
    from tests.test_train import run_train
    from vlrm.data.synthetic_steps import make_steps_dataset
    from vlrm.use.scoring import RewardScorer

    train, held_out = make_steps_dataset(tmp_path / "data", num_train=8, num_eval=4, image_size=56)
    run_train(
        tmp_path, tiny_model_dir, synthetic_dir, "--dataset_path", str(train), "--eval_dataset_path", str(held_out),
        "--reward_type", "process", "--use_lora", "true", "--lora_r", "8", "--max_steps", "4",
    )  # fmt: skip
    output = tmp_path / "out"
    config = json.loads((output / "checkpoint-4" / "config.json").read_text())
    assert config["vlrm_reward_type"] == "process" and config["vlrm_step_aggregation"] == "mean"
    log = (output.parent / "logs").glob("train_*.log")
    text = "".join(path.read_text() for path in log)
    assert "process reward: 8 rows of step-labelled solutions" in text and "held-out step accuracy" in text
    scorer = RewardScorer.from_pretrained(output / "checkpoint-4", dtype="float32", device="cpu")
    rows = [json.loads(line) for line in held_out.read_text().splitlines()]
    items = [{"prompt": row["question"], "images": [str(held_out.parent / image) for image in row["images"]],
              "steps": solution["steps"]} for row in rows for solution in row["solutions"]]  # fmt: skip
    scores = scorer.score_steps(items)
    assert len(scores.steps) == 16 and all(len(steps) == 3 for steps in scores.steps)
    assert np.isfinite(scores.scores).all() and ((0 < scores.scores) & (scores.scores < 1)).all()
    text_split = scorer.score_steps([{**items[0], "steps": None, "response": "\n\n".join(items[0]["steps"])}])
    assert np.allclose(text_split.steps[0], scores.steps[0], atol=1e-6)  # a response text split at the separator
    outcome = RewardScorer.from_pretrained(save_reward_checkpoint(tmp_path / "outcome"), dtype="float32")
    with pytest.raises(ValueError, match="outcome reward model"):
        outcome.score_steps(items[:1])
