"""Heads x pooling x objectives from the command line, end to end: each combination trains the tiny model through
train_rm.py (in-process, as `python train_rm.py` would run) on rows of N responses, its loss falls, it prints and
saves its held-out metric, and the model it saved scores exactly as the trained one in every consumer: the
RewardScorer, the eval sweep (eval_rm.py), the GRPO reward function and the server.

Nine runs cover every head (linear, MLP, attributes), every pooling (last, mean, attention), every objective (bt,
bt_ties with Rao-Kupper and Davidson, listwise, hps, mse on scores and on attribute ratings), the learnable scale and
LoRA, each at least once: the full product (90 runs) would add minutes and no code path.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from tests.test_server import call, serving
from tests.test_train import run_train
from vlrm.data.prepare import load_preference_dataset
from vlrm.data.synthetic import make_ranking_dataset
from vlrm.layout.labels import LABEL_FIELDS
from vlrm.layout.packed import PackedPreferenceCollator, make_collator
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import RewardScorer
from vlrm.use.server.app import create_app
from vlrm.use.server.settings import ServerSettings

ATTRIBUTES = ["--reward_attributes", "accuracy", "closeness"]
# name -> (train_rm.py overrides, training data: "ranking" (N = 4 with ties), "untied" (N = 2-3, no ties), "vlfeedback")
RECIPES = {
    "linear-last-bt": (["--loss_type", "bt"], "untied"),
    "mlp-mean-bt_ties": (["--score_head", "mlp", "--reward_pooling", "mean", "--loss_type", "bt_ties"], "ranking"),
    "linear-attention-scale-listwise": (
        ["--reward_pooling", "attention", "--learnable_reward_scale", "true", "--loss_type", "listwise"], "ranking",
    ),
    "mlp-attention-hps": (["--score_head", "mlp", "--reward_pooling", "attention", "--loss_type", "hps"], "ranking"),
    "linear-mean-mse": (["--reward_pooling", "mean", "--loss_type", "mse"], "ranking"),
    "attributes-last-mse": ([*ATTRIBUTES, "--loss_type", "mse"], "ranking"),
    "attributes-attention-davidson": (
        [*ATTRIBUTES, "--reward_weights", "0.7", "0.3", "--reward_pooling", "attention", "--loss_type", "bt_ties",
         "--tie_model", "davidson", "--learnable_reward_scale", "true"], "ranking",
    ),
    "mlp-last-listwise-lora": (
        ["--score_head", "mlp", "--loss_type", "listwise", "--use_lora", "true", "--lora_r", "4"], "ranking",
    ),
    "linear-last-hps-vlfeedback": (["--loss_type", "hps"], "vlfeedback"),
}  # fmt: skip
STEPS = 5
ROWS = 8  # the whole training set in every step: the loss must fall


def vlfeedback_row(index: int, image: str, ratings: list[list[int]]) -> dict:
    """A row in VLFeedback's released layout: 4 completions, each rated 1-5 on its three aspects."""
    aspects = ("Helpfulness", "Visual Faithfulness", "Ethical Considerations")
    return {
        "id": f"vlf-{index}",
        "prompt": "What color are the shapes?",
        "img_path": image,
        "models": [f"model-{k}" for k in range(4)],
        "completions": [
            {"model": f"model-{k}", "response": answer,
             "annotations": {aspect: {"Rating": str(value), "Rationale": "-"} for aspect, value in
                             zip(aspects, rating, strict=True)}}
            for k, (answer, rating) in enumerate(zip(
                ["The shapes are red.", "The shapes are blue.", "The shapes are green.", "The shapes are yellow."],
                ratings, strict=True,
            ))
        ],
    }  # fmt: skip


@pytest.fixture(scope="module")
def recipe_data(tmp_path_factory):
    """The synthetic N = 4 set, a tie-free version of it (each rank's first response), and a VLFeedback file."""
    root = tmp_path_factory.mktemp("recipes")
    train, held_out = make_ranking_dataset(root, num_train=16, num_eval=8, seed=0, image_size=56)
    rows = [json.loads(line) for line in train.read_text().splitlines()]
    untied = []
    for row in rows:
        keep = [row["ranks"].index(rank) for rank in sorted(set(row["ranks"]))]
        untied.append({key: row[key] for key in ("id", "images", "question", "category")}
                      | {"responses": [row["responses"][k] for k in keep], "ranks": [row["ranks"][k] for k in keep]})  # fmt: skip
    (root / "untied.jsonl").write_text("".join(json.dumps(row) + "\n" for row in untied))
    vlfeedback = [
        vlfeedback_row(index, row["images"][0], [[5, 5, 5], [3, 2, 5], [1, 1, 5], [2, 3, 4]])
        for index, row in enumerate(rows)
    ]
    (root / "vlfeedback.jsonl").write_text("".join(json.dumps(row) + "\n" for row in vlfeedback))
    return {"ranking": train, "untied": root / "untied.jsonl", "vlfeedback": root / "vlfeedback.jsonl",
            "eval": held_out, "root": root}  # fmt: skip


def single_rows(held_out) -> list[dict]:
    """Each response of the first 3 held-out rows as a row to score alone (question, image path, response)."""
    rows = [json.loads(line) for line in held_out.read_text().splitlines()[:3]]
    return [{"prompt": row["question"], "images": [str(held_out.parent / row["images"][0])], "response": response}
            for row in rows for response in row["responses"]]  # fmt: skip


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_head_and_objective_trains_from_the_cli_and_reloads_identically_everywhere(
    name, recipe_data, tmp_path, tiny_model_dir, synthetic_dir, eval_rm
):
    overrides, data = RECIPES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # attributes under a ranking loss: trained only as their sum
        run = run_train(
            tmp_path, tiny_model_dir, synthetic_dir, *overrides, "--dataset_path", str(recipe_data[data]),
            "--eval_dataset_path", str(recipe_data["eval"]), "--max_train_samples", str(ROWS),
            "--per_device_train_batch_size", str(ROWS), "--max_steps", str(STEPS), "--save_steps", str(STEPS),
            "--reward_stats_samples", "4",
        )  # fmt: skip
    output = tmp_path / "out"

    # The loss falls, the held-out metrics of N-way rows are printed and saved.
    state = json.loads((output / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert len(losses) == STEPS and losses[-1] < losses[0], losses
    metrics = json.loads((output / "eval_results.json").read_text())
    assert {"eval_accuracy", "eval_top1_accuracy", "eval_kendall_tau"} <= set(metrics)
    log = next((tmp_path / "logs").glob("*.log")).read_text()
    assert f"held-out pairwise accuracy {metrics['eval_accuracy']:.4f}, top-1 accuracy" in log
    if data == "vlfeedback":  # read N-way, never binarised
        assert "rows by kind" in log and "8 of N responses" in log

    # The trained model (in memory) and every consumer of the saved one give the same rewards.
    model = run["model"].eval()
    rows = single_rows(recipe_data["eval"])
    scorer = RewardScorer.from_pretrained(output, device="cpu")
    rewards = scorer.score(rows)
    collator = make_collator(run["encoder"], run["config"].packing)
    eval_rows, _ = load_preference_dataset(recipe_data["eval"], encoder=run["encoder"])
    with torch.no_grad():
        batch = collator([eval_rows[index] for index in range(3)])
        trained = model(**{key: value for key, value in batch.items() if key not in LABEL_FIELDS}).rewards
    labels = batch["reward_labels"]
    trained_rows = np.concatenate([trained[labels.matrix[row]].numpy() for row in range(3)])
    np.testing.assert_allclose(rewards, trained_rows, rtol=1e-5, atol=1e-5)  # saved = trained

    function = VLRewardFunction(scorer)
    from_grpo = function([row["prompt"] for row in rows], [row["response"] for row in rows],
                         images=[row["images"] for row in rows])  # fmt: skip
    np.testing.assert_allclose(from_grpo, rewards, rtol=1e-5, atol=1e-5)

    settings = ServerSettings(image_root=str(recipe_data["root"]), max_wait_ms=1)
    with serving(create_app(RewardScorer.from_pretrained(output, device="cpu"), settings, output)) as port:
        items = [{"prompt": row["prompt"], "images": [row["images"][0].removeprefix(f"{recipe_data['root']}/")],
                  "response": row["response"]} for row in rows]  # fmt: skip
        status, reply = call(port, "POST", "/score", {"items": items}, key=None)
    assert status == 200, reply
    np.testing.assert_allclose(reply["rewards"], rewards, rtol=1e-5, atol=1e-5)

    config = tmp_path / "eval.json"
    config.write_text(json.dumps({
        "model_dirs": [str(output)], "dataset_path": str(recipe_data["eval"]), "eval_batch_size": 4,
        "results_dir": str(tmp_path / "results"), "log_dir": str(tmp_path / "eval_logs"),
        "base_model_path": str(tiny_model_dir),
    }))  # fmt: skip
    assert eval_rm.main([str(config)]) == 0
    result = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())["results"]
    swept = next(row for row in result if row["checkpoint"] == f"checkpoint-{STEPS}")
    assert swept["status"] == "ok" and swept["top1_accuracy"] is not None
    responses = pd.read_csv(tmp_path / "results" / swept["pairs_file"])
    per_response = {(row.id, row.response): row.score for row in responses.itertuples()}
    ids = [eval_rows[index]["id"] for index in range(3)]
    swept_scores = [per_response[(ids[row], k)] for row in range(3) for k in range(4)]
    np.testing.assert_allclose(swept_scores, rewards, rtol=1e-5, atol=1e-5)
    if "attributes" in name:  # each head against its own rating
        assert set(swept["attributes"]) == {"accuracy", "closeness"}
        assert swept["attributes"]["accuracy"]["num_rated"] == 8 * 4


def test_a_vlfeedback_row_s_completions_hang_under_one_prompt_node(recipe_data, encoder):
    """VLFeedback as released: its 4 completions under one prompt node, the image encoded once, the three aspects
    as ratings and their mean as the score."""
    dataset, _ = load_preference_dataset(recipe_data["vlfeedback"], encoder=encoder)
    row = dataset[0]
    assert len(row["responses"]) == 4 and row["rating_names"] == [
        "helpfulness", "visual_faithfulness", "ethical_considerations",
    ]  # fmt: skip
    assert row["scores"] == pytest.approx([5.0, 10 / 3, 7 / 3, 3.0]) and row["ranks"] == [0.0, 1.0, 3.0, 2.0]
    batch = PackedPreferenceCollator(encoder)([dataset[0], dataset[1]])
    layout = batch["packed_layout"]
    assert [len(spans) for spans in layout.branch_spans] == [4, 4]
    assert batch["image_grid_thw"].shape[0] == 2  # one image per row, not one per completion
    assert batch["reward_labels"].num_rewards == 8
