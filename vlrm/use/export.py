"""Export a vlrm checkpoint for vLLM's pooling runner as its family's ``*ForSequenceClassification``; merge a LoRA one.

    python -m vlrm export outputs/run exports/run-vllm
    vllm serve exports/run-vllm --runner pooling          # then POST /pooling (or /classify), see the README
    python -m vlrm export --merge outputs/lora-run exports/lora-run-merged [--base_model_path DIR] [--dtype float32]
    python -m vlrm export exports/lora-run-merged exports/lora-run-vllm

``--merge`` turns a vlrm LoRA checkpoint (``vlrm.model.checkpoints``: adapters + score head) into a full standalone
vlrm checkpoint: the base model with the adapters folded into its weights (``W + (alpha / r) B A``, peft's
``merge_and_unload``), the trained head, the reward model's config and the processor. Its rewards are the adapter
model's (to float round-off in float32; ``--dtype auto`` keeps the dtype the run trained in, where bf16 rounds the
merged weights once), and it loads, evaluates and exports like any full checkpoint.

A vlrm checkpoint already stores the weights under the names of its family's ``*ForConditionalGeneration``
checkpoint (for Qwen2.5-VL: ``model.*`` for the language model, ``visual.*`` for the vision tower and merger) without
``lm_head``, plus a top-level ``score.weight`` of shape ``[1, hidden]``: what vLLM's sequence-classification adapter
loads for a ``*ForSequenceClassification`` architecture on that family's loader (last-token pooling, ``num_labels``
1). The export writes those weights unchanged with a config that names that architecture
(``vlrm.model.families``: ``Qwen2_5_VLForSequenceClassification``, ``Qwen3VLForSequenceClassification``, ...; Qwen3.5's
``Qwen3_5ForSequenceClassification`` is also transformers' own class, which loads a vlrm checkpoint as it stands),
sets ``num_labels`` 1, records how the reward is read, and copies the processor.
 The reward is the score at the end-of-turn token that closes the assistant turn (``<|im_end|>`` for Qwen). Qwen's chat
template puts a newline after every ``<|im_end|>``: the text sent to vLLM must end at that token (``reward_text``
renders it), or vLLM scores the newline instead. vLLM applies an activation to classification outputs by default; ask
for raw scores (``use_activation: false`` in the request, ``PoolingParams(use_activation=False)`` offline) to get
vlrm's rewards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from safetensors import safe_open

from vlrm.data.rows import user_prompt
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.model.checkpoints import check_loadable, is_lora_checkpoint
from vlrm.model.families import family_of
from vlrm.model.loading import load_checkpoint

PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "added_tokens.json", "video_preprocessor_config.json", "generation_config.json",
)  # fmt: skip


def reward_text(processor: Any, prompt: list[dict] | str, response: str) -> str:
    """The exact text whose last token carries the reward: the rendered prompt, the response, ``<|im_end|>`` and
    nothing after it (images appear as the processor's image placeholders)."""
    encoder = PreferenceEncoder(processor)
    if isinstance(prompt, str):
        prompt = user_prompt(prompt, 0)
    return encoder.prompt_text(prompt) + response + encoder.end_of_turn


def weight_names(model_dir: Path) -> list[str]:
    names = []
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            names += list(weights.keys())
    return names


def export_for_vllm(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Write ``output_dir``: the checkpoint's weights (unchanged), a config naming its family's
    ``*ForSequenceClassification`` and the processor. Raises ``ValueError`` for a checkpoint without a score head."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    check_loadable(checkpoint_dir)
    if (checkpoint_dir / "adapter_config.json").is_file() and not any(checkpoint_dir.glob("model*.safetensors")):
        raise ValueError(
            f"{checkpoint_dir}: a LoRA checkpoint (adapter + head, no base weights); merge it first: python -m "
            f"vlrm export --merge {checkpoint_dir} MERGED_DIR, then python -m vlrm export MERGED_DIR {output_dir}"
        )
    names = weight_names(checkpoint_dir)
    generation_head = [name for name in names if name.startswith("lm_head.") or ".lm_head." in name]
    if "score.weight" not in names or generation_head:
        raise ValueError(
            f"{checkpoint_dir}: not a vlrm reward checkpoint (score.weight present: {'score.weight' in names}; "
            f"generation head weights: {generation_head[:3]})"
        )
    from transformers import AutoConfig, AutoProcessor

    model_config = AutoConfig.from_pretrained(checkpoint_dir)
    architecture = family_of(model_config).classification_architecture(model_config)
    reward_token = PreferenceEncoder(AutoProcessor.from_pretrained(checkpoint_dir)).end_of_turn
    config = json.loads((checkpoint_dir / "config.json").read_text())
    config.update(
        architectures=[architecture],
        num_labels=1,
        id2label={"0": "reward"},
        label2id={"reward": 0},
        vlrm={
            "reward_token": reward_token,
            "note": f"the text must end at the reward token: drop what the chat template writes after {reward_token}",
            "reward_mean": config.get("reward_mean"),
            "reward_std": config.get("reward_std"),
        },
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))
    for file in checkpoint_dir.iterdir():
        if (
            file.suffix == ".safetensors"
            or file.name == "model.safetensors.index.json"
            or file.name in PROCESSOR_FILES
        ):
            shutil.copy2(file, output_dir / file.name)
    return output_dir


def merge_adapter(
    adapter_dir: str | Path, output_dir: str | Path, base_model_path: str | Path | None = None, dtype: str = "auto"
) -> Path:
    """Write ``output_dir``: a vlrm LoRA checkpoint merged into its base model (see the module docstring), a full
    vlrm checkpoint. ``base_model_path``: the base when the one the adapter records is not reachable here; ``dtype``:
    auto (the checkpoint config's), float32, bfloat16 or float16. Raises ``CheckpointError`` / ``ValueError``."""
    adapter_dir, output_dir = Path(adapter_dir), Path(output_dir)
    check_loadable(adapter_dir)
    if not is_lora_checkpoint(adapter_dir):
        raise ValueError(f"{adapter_dir}: not a vlrm LoRA checkpoint; a full checkpoint needs no merge")
    model, processor = load_checkpoint(adapter_dir, base_model_path, dtype, merge_lora=True)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    if (adapter_dir / "trainer_state.json").is_file():  # the step, for eval_rm.py's sweep
        shutil.copy2(adapter_dir / "trainer_state.json", output_dir / "trainer_state.json")
    return output_dir


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlrm export", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="a vlrm checkpoint (a checkpoint-* dir or a run's final model)")
    parser.add_argument("output_dir", help="where the vLLM-servable copy (with --merge: the merged checkpoint) goes")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="checkpoint_dir is a vlrm LoRA checkpoint: write it merged into its base model as a full vlrm "
        "checkpoint (export that one for vLLM afterwards)",
    )
    parser.add_argument(
        "--base_model_path", help="with --merge: the base model, when the one the adapter records is not found here"
    )
    parser.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="with --merge: dtype of the merged weights (auto: the one the checkpoint's config records)",
    )
    arguments = parser.parse_args(argv)
    if arguments.merge:
        merged = merge_adapter(
            arguments.checkpoint_dir, arguments.output_dir, arguments.base_model_path, arguments.dtype
        )
        print(f"merged into a full vlrm checkpoint: {merged}")
        return 0
    print(f"exported for vLLM's pooling runner: {export_for_vllm(arguments.checkpoint_dir, arguments.output_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
