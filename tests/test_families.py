"""Every model family on its tiny offline model: packed equals padded where packing is supported (Qwen3.5's linear
attention included), freeze_vit freezes exactly the vision tower, a short training run lowers the loss, its checkpoint
reloads with identical rewards, eval_rm.py scores it and the export names it; Qwen3.5 checkpoints load in
transformers' own sequence-classification class."""

import importlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoConfig, AutoProcessor, set_seed

from tests.test_packing import _assert_same_rewards_and_grads, _model_inputs, _prompt, _row, _same_prompt
from tests.test_train import run_train
from vlrm.data.prepare import load_preference_dataset
from vlrm.layout.attention import enable_packed_attention
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.layout.packed import PackedPreferenceCollator
from vlrm.layout.padded import PaddedPreferenceCollator, split_rewards
from vlrm.model.families import FAMILIES, GENERIC, family_of
from vlrm.model.lora import linear_layer_names
from vlrm.model.reward_model import VLRewardModel
from vlrm.tiny import TINY_FAMILIES
from vlrm.use.export import export_for_vllm

PACKED = [family.name for family in FAMILIES if family.packed]
# family -> (vision tower, its aligners: they keep training under freeze_vit), as the test expects them
VISION = {
    "qwen2_vl": ("visual", ["visual.merger"]),
    "qwen2_5_vl": ("visual", ["visual.merger"]),
    "qwen3_vl": ("visual", ["visual.merger", "visual.deepstack_merger_list"]),
    "qwen3_vl_moe": ("visual", ["visual.merger", "visual.deepstack_merger_list"]),
    "qwen3_5": ("visual", ["visual.merger"]),
    "qwen3_5_moe": ("visual", ["visual.merger"]),
    "llava": ("vision_tower", ["multi_modal_projector"]),
    "gemma3": ("vision_tower", ["multi_modal_projector"]),
}

# The vLLM export's architecture per family (vlrm.use.export.VLLM_RECIPES, checked by bench/check_vllm.py); the
# families vLLM 0.32 cannot serve are refused with the reason.
EXPORTED = {
    "qwen2_vl": "Qwen2VLForSequenceClassification", "qwen2_5_vl": "Qwen2_5_VLForSequenceClassification",
    "qwen3_vl": "Qwen3VLForSequenceClassification", "qwen3_5": "Qwen3_5ForConditionalGeneration",
}  # fmt: skip
END_OF_TURN = dict.fromkeys(VISION, "<|im_end|>") | {"llava": "</s>", "gemma3": "<end_of_turn>"}


def _encoder(model_dir) -> PreferenceEncoder:
    return PreferenceEncoder(AutoProcessor.from_pretrained(model_dir))


def test_every_tiny_model_maps_to_its_family(family_dirs):
    assert set(TINY_FAMILIES) == set(VISION)
    for name in TINY_FAMILIES:
        family = family_of(AutoConfig.from_pretrained(family_dirs(name)))
        assert family.name == (GENERIC.name if name in ("llava", "gemma3") else name)
    with pytest.raises(ValueError, match="not an image-text-to-text model"):
        family_of(AutoConfig.for_model("bert"))


def _sequential_delta_rule(monkeypatch, model) -> None:
    """Qwen3.5's linear attention through transformers' step-by-step recurrent kernel instead of its chunked one.
    The chunked kernel's own float32 error (its gradients differ from the recurrent kernel's by ~1e-4 relative, in
    the padded layout alone) would hide what the test checks: that each packed branch starts from its prompt."""
    for module in {importlib.import_module(type(layer).__module__) for layer in _linear_attention_layers(model)}:

        def sequential(*args, chunk_size=64, _recurrent=module.torch_recurrent_gated_delta_rule, **kwargs):
            return _recurrent(*args, **kwargs)

        monkeypatch.setattr(module, "torch_chunk_gated_delta_rule", sequential)


def _linear_attention_layers(model) -> list:
    return [module for module in model.modules() if type(module).__name__.endswith("GatedDeltaNet")]


@pytest.mark.parametrize("name", PACKED)
def test_packed_equals_padded(name, family_dirs, monkeypatch):
    """Rewards and gradients, with images shared between prompt nodes (deduplicated: DeepStack features too)."""
    set_seed(0)
    model = VLRewardModel.from_pretrained(family_dirs(name), dtype=torch.float32)
    if family_of(model.config).recurrent:
        _sequential_delta_rule(monkeypatch, model)
    enable_packed_attention(model)
    model.train()  # no dropout in the tiny models; the MoE router runs as in training
    rows = [_row(1, 1, 6, 4, 9), _row(2, 2, 3, 7, 2), _row(3, 0, 8, 3, 3)]
    # Pair 1's irrelevant prompt is a new question on pair 0's image (irrelevant_mode: image).
    other_question = {"prompt": _prompt(1, "What else is there?"), "images": [rows[0]["images"][0].copy()]}
    rows[0]["irrelevant"], rows[1]["irrelevant"], rows[2]["irrelevant"] = (
        [_same_prompt(rows[1])], [other_question], [_same_prompt(rows[0])],
    )  # fmt: skip
    _, packed = _assert_same_rewards_and_grads(model, _encoder(family_dirs(name)), rows)
    assert packed["packed_layout"].deduplicated_images


@pytest.mark.parametrize("name", ["llava", "gemma3"])
def test_padded_only_families_refuse_the_packed_attention(name, family_dirs):
    model = VLRewardModel.from_pretrained(family_dirs(name))
    with pytest.raises(ValueError, match="has no packed layout"):
        enable_packed_attention(model)


@pytest.mark.parametrize("name", sorted(VISION))
def test_freeze_vit_freezes_exactly_the_vision_tower(name, family_dirs):
    model = VLRewardModel.from_pretrained(family_dirs(name))
    model.freeze_vision_tower()
    tower, aligners = VISION[name]
    names = [parameter_name for parameter_name, _ in model.named_parameters()]
    aligner = {n for n in names if n.startswith(tuple(f"model.{part}." for part in aligners))}
    expected = {n for n in names if n.startswith(f"model.{tower}.")} - aligner
    frozen = {n for n, parameter in model.named_parameters() if not parameter.requires_grad}
    assert expected and aligner and frozen == expected
    # LoRA's lora_vision=merger puts adapters on the same aligners (Gemma 3's projector is a bare weight matrix with
    # no linear layer to adapt).
    merger_layers = set(linear_layer_names(model, vision="merger")) - set(linear_layer_names(model))
    assert all(f"{layer}.weight" in aligner for layer in merger_layers)
    assert bool(merger_layers) == (name != "gemma3")


def _train(tmp_path, model_dir, synthetic_dir, *overrides):
    """train_rm.py in-process (``tests.test_train.run_train``): 8 steps, 4 epochs over 8 pairs, the final model only."""
    return run_train(
        tmp_path, model_dir, synthetic_dir, "--max_train_samples", "8", "--max_steps", "8", "--learning_rate", "2e-3",
        "--save_strategy", "no", "--reward_stats_samples", "8", "--freeze_vit", "true", *overrides,
    )  # fmt: skip


@pytest.mark.parametrize("name", sorted(VISION))
def test_trains_saves_reloads_and_evaluates(name, tmp_path, family_dirs, synthetic_dir, eval_rm):
    run = _train(tmp_path, family_dirs(name), synthetic_dir)
    losses = [entry["loss"] for entry in run["trainer"].state.log_history if "loss" in entry]
    assert len(losses) == 8 and np.mean(losses[-2:]) < np.mean(losses[:2])  # 4 epochs over 8 pairs
    output = tmp_path / "out"
    saved = json.loads((output / "config.json").read_text())
    assert saved["vlrm_family"] == family_of(run["model"].config).name
    assert saved["architectures"] == [type(run["model"]).__name__] and isinstance(run["model"], VLRewardModel)
    if name in EXPORTED:
        exported = json.loads((export_for_vllm(output, tmp_path / "vllm") / "config.json").read_text())
        assert exported["architectures"] == [EXPORTED[name]] and exported["vlrm"]["reward_token"] == END_OF_TURN[name]
    else:
        with pytest.raises(ValueError, match=r"cannot be exported for vLLM .*: .+ serve this one with serve_rm\.py"):
            export_for_vllm(output, tmp_path / "vllm")

    encoder = _encoder(output)
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl")
    batch = PaddedPreferenceCollator(encoder)(list(dataset))
    num_pairs, num_irrelevant = batch.pop("num_pairs"), batch.pop("num_irrelevant")
    reloaded = VLRewardModel.from_pretrained(output).eval()
    with torch.no_grad():
        in_memory = run["model"].eval()(**batch).rewards
        torch.testing.assert_close(reloaded(**batch).rewards, in_memory, rtol=0, atol=0)
    chosen, rejected, _ = split_rewards(in_memory, num_pairs, num_irrelevant)

    config = tmp_path / "eval.yaml"
    config.write_text(json.dumps({
        "model_dirs": [str(output)], "dataset_path": str(synthetic_dir / "eval.jsonl"), "max_eval_samples": 6,
        "results_dir": str(tmp_path / "results"), "log_dir": str(tmp_path / "logs"), "eval_batch_size": 4,
    }))  # fmt: skip
    assert eval_rm.main([str(config)]) == 0
    report = json.loads((tmp_path / "results" / "evaluation_results.json").read_text())
    pairs = pd.read_csv(report["results"][-1]["pairs_file"])
    index = [list(dataset["id"]).index(pair_id) for pair_id in pairs["id"]]  # the sweep's 6 drawn pairs
    assert len(index) == 6
    np.testing.assert_allclose(pairs["chosen_score"], chosen.numpy()[index], rtol=0, atol=1e-5)
    np.testing.assert_allclose(pairs["rejected_score"], rejected.numpy()[index], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["qwen3_5", "qwen3_5_moe"])
def test_qwen3_5_linear_attention_branches_start_from_their_prompt(name, family_dirs):
    """The Gated DeltaNet layers run the packed row segment by segment; run as transformers writes them (one
    sequence), the second branch of a prompt would continue from the first branch's state and score differently."""
    set_seed(0)
    model = VLRewardModel.from_pretrained(family_dirs(name), dtype=torch.float32).eval()
    enable_packed_attention(model)
    layers = _linear_attention_layers(model)
    assert layers and all(type(layer).__name__.startswith("Packed") for layer in layers)
    encoder = _encoder(family_dirs(name))
    rows = [_row(5, 1, 4, 6, 3), _row(6, 0, 5, 2, 7)]
    padded = _model_inputs(PaddedPreferenceCollator(encoder)(rows))
    packed = _model_inputs(PackedPreferenceCollator(encoder)(rows))
    with torch.no_grad():
        expected = model(**padded).rewards
        torch.testing.assert_close(model(**packed).rewards, expected, rtol=1e-5, atol=1e-6)
        for layer in layers:  # back to transformers' own layer: one state along the whole row
            layer.__class__ = type(layer).__mro__[1]
        naive = model(**packed).rewards
    assert not torch.allclose(naive, expected, atol=1e-3)


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5", "gemma3"])
def test_lora_adapter_checkpoint_scores_as_in_training(name, tmp_path, family_dirs, synthetic_dir):
    """LoRA on the language model and the aligners (Qwen3-VL's merger and DeepStack mergers); the adapter
    checkpoint, merged on load, scores as the adapter model did in training."""
    from vlrm.use.scoring import RewardScorer

    run = _train(tmp_path, family_dirs(name), synthetic_dir, "--use_lora", "true", "--lora_r", "4", "--lora_vision",
                 "merger", "--freeze_vit", "false")  # fmt: skip
    adapted = {key.split(".lora_")[0] for key, _ in run["model"].named_parameters() if ".lora_" in key}
    _, aligners = VISION[name]
    assert any(any(f".model.{part}." in layer for part in aligners) for layer in adapted) == (name != "gemma3")
    assert (tmp_path / "out" / "adapter_config.json").is_file()
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=4)
    scorer = RewardScorer.from_pretrained(tmp_path / "out", device="cpu")
    batch = PaddedPreferenceCollator(scorer.encoder)(list(dataset))
    inputs = {key: value for key, value in batch.items() if key not in ("num_pairs", "num_irrelevant", "margin")}
    with torch.no_grad():
        in_training = run["model"].eval()(**inputs).rewards
        torch.testing.assert_close(scorer.model(**inputs).rewards, in_training, rtol=0, atol=1e-5)


def test_qwen3_5_checkpoint_loads_in_transformers_sequence_classification(family_dirs, tmp_path, synthetic_dir):
    """Same ``model`` + ``score`` layout and last-token pooling: a vlrm checkpoint is a
    ``Qwen3_5ForSequenceClassification`` checkpoint as it stands."""
    import transformers

    native_class = getattr(
        transformers, family_of(AutoConfig.from_pretrained(family_dirs("qwen3_5"))).native_classifier
    )
    encoder = _encoder(family_dirs("qwen3_5"))
    model = VLRewardModel.from_pretrained(family_dirs("qwen3_5")).eval()
    with torch.no_grad():
        model.score.weight.normal_(generator=torch.Generator().manual_seed(1))
    model.config.pad_token_id = encoder.pad_token_id
    model.save_pretrained(tmp_path / "reward")
    native = native_class.from_pretrained(tmp_path / "reward").eval()
    assert native_class.__name__ == "Qwen3_5ForSequenceClassification"
    dataset, _ = load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=4)
    batch = PaddedPreferenceCollator(encoder)(list(dataset))
    inputs = {key: value for key, value in batch.items() if key not in ("num_pairs", "num_irrelevant", "margin")}
    with torch.no_grad():
        expected = model(**inputs).rewards
        torch.testing.assert_close(native(**inputs).logits[:, 0].float(), expected, rtol=0, atol=1e-6)


def test_pixel_limits_name_the_processor_that_resizes_to_a_fixed_size(family_dirs):
    from vlrm.layout.encoder import apply_pixel_limits

    processor = AutoProcessor.from_pretrained(family_dirs("gemma3"))
    with pytest.raises(ValueError, match="Gemma3ImageProcessor resizes images to"):
        apply_pixel_limits(processor, 200704, None)
    qwen = AutoProcessor.from_pretrained(family_dirs("qwen3_vl"))
    apply_pixel_limits(qwen, None, 64 * 64)
    assert qwen.image_processor.size["longest_edge"] == 64 * 64


@pytest.mark.parametrize("name", ["qwen3_vl", "qwen3_5", "gemma3"])
def test_single_responses_and_the_grpo_reward_function_score_as_pairs(name, tmp_path, family_dirs, synthetic_dir):
    """The reward in use on other families: ``RewardScorer.score`` (packed where the family packs, padded for the
    generic path) and TRL's reward-function contract give each response the reward the pair collator gives it."""
    from vlrm.use.rewards import VLRewardFunction
    from vlrm.use.scoring import RewardScorer

    model = VLRewardModel.from_pretrained(family_dirs(name))
    with torch.no_grad():
        model.score.weight.normal_(generator=torch.Generator().manual_seed(2))
    model.save_pretrained(tmp_path / "reward")
    AutoProcessor.from_pretrained(family_dirs(name)).save_pretrained(tmp_path / "reward")
    scorer = RewardScorer.from_pretrained(tmp_path / "reward", device="cpu")
    assert scorer.packing == family_of(model.config).packed
    rows = list(load_preference_dataset(synthetic_dir / "eval.jsonl", max_samples=4)[0])
    pairs = scorer.score_pairs(rows, progress=False)
    singles = [{"prompt": row["prompt"], "images": row["images"], "response": row["chosen"]} for row in rows]
    np.testing.assert_allclose(scorer.score(singles), pairs.chosen, rtol=0, atol=1e-5)
    reward = VLRewardFunction.from_pretrained(tmp_path / "reward", device="cpu")
    from_trl = reward([row["prompt"] for row in rows], [row["rejected"] for row in rows],
                      images=[row["images"] for row in rows])  # fmt: skip
    np.testing.assert_allclose(from_trl, pairs.rejected, rtol=0, atol=1e-5)


def test_get_reward_refuses_chat_text_it_cannot_read_back(tmp_path, family_dirs):
    """OpenRLHF's /get_reward on a Gemma 3 checkpoint: a plain question is scored; a Gemma-templated prompt, which
    would be templated a second time, is refused with the item and field (chat turns are read back in Qwen's format)."""
    from vlrm.use.scoring import RewardScorer
    from vlrm.use.server.requests import RequestParser
    from vlrm.use.server.settings import RequestError, ServerSettings

    model = VLRewardModel.from_pretrained(family_dirs("gemma3"))
    model.save_pretrained(tmp_path / "reward")
    AutoProcessor.from_pretrained(family_dirs("gemma3")).save_pretrained(tmp_path / "reward")
    parser = RequestParser(RewardScorer.from_pretrained(tmp_path / "reward", device="cpu"), ServerSettings())
    rows, _ = parser.get_reward_request(json.dumps({"query": ["Colour? Red."], "prompts": ["Colour? "]}).encode())
    assert rows[0]["prompt"][0]["content"][-1]["text"] == "Colour? " and rows[0]["response"] == "Red."
    templated = "<bos><start_of_turn>user\nColour?<end_of_turn>\n<start_of_turn>model\n"
    body = json.dumps({"query": [templated + "Red."], "prompts": [templated]}).encode()
    with pytest.raises(RequestError, match="chat format is not read back") as raised:
        parser.get_reward_request(body)
    assert (raised.value.item, raised.value.field) == (0, "prompts")
