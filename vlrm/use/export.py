"""Export a vlrm checkpoint for vLLM's pooling runner, as vLLM 0.32's loader reads each family; merge a LoRA one.

    python -m vlrm export outputs/run exports/run-vllm
    python -m vllm.entrypoints.openai.api_server --model exports/run-vllm --runner pooling   # then POST /classify
    python -m vlrm export --merge outputs/lora-run exports/lora-run-merged [--base_model_path DIR] [--dtype float32]
    python -m vlrm export exports/lora-run-merged exports/lora-run-vllm

What the export writes, per family (``VLLM_RECIPES``; checked by running vLLM 0.32.0's CPU build with
``bench/check_vllm.py``, which scores the same rows through vlrm, vLLM offline and vLLM's server):

- **Qwen2-VL, Qwen2.5-VL** (``Qwen2VLForSequenceClassification``, ``Qwen2_5_VLForSequenceClassification``): vLLM
  builds the classifier's language model as its own ``Qwen2ForSequenceClassification`` and takes the head from it,
  so the head is stored as ``language_model.score.weight`` (vLLM's ``hf_to_vllm_mapper`` passes that name through;
  a top-level ``score.weight`` matches no parameter: ``There is no module or parameter named 'score'``).
- **Qwen3-VL** (``Qwen3VLForSequenceClassification``): vLLM builds the language model directly and the classifier
  puts ``score`` at the top: the head stays ``score.weight``.
- **Qwen3.5** (``Qwen3_5ForConditionalGeneration``, served with ``--convert classify``): vLLM resolves the name
  ``Qwen3_5ForSequenceClassification`` to its text-only ``Qwen3_5ForCausalLM`` (the vision weights then fail to
  load), so the export names the multimodal class and the server is told to convert it. The head stays
  ``score.weight``. vLLM's CPU build runs Qwen3.5's Gated DeltaNet in bfloat16 only, so on a CPU this family was
  checked to bfloat16 round-off, not to float32.
- Qwen3-VL-MoE, Qwen3.5-MoE and the generic image-text-to-text path are refused with the reason (``VLLM_REFUSALS``).

Every served family also gets ``num_labels: 1`` (top level and ``text_config``: vLLM sizes the head from one or the
other depending on its version), ``problem_type: regression`` (vLLM then applies no activation to the score, so a
client that forgets ``use_activation: false`` still gets the raw reward rather than its sigmoid) and a ``vlrm``
entry: the reward token, the reward statistics, the vLLM flags. Any tensor vLLM would not map (an extra head, a
generation head) stops the export with its name: a file that loads and scores differently is never written. vlrm
itself loads an export like any checkpoint (``vlrm.model.loading`` maps ``language_model.score.weight`` back).

Heads (``vlrm.model.heads``): vLLM's sequence-classification runner is the backbone and one ``Linear(hidden, 1)``
read at the last token, which is vlrm's default head exactly. A head it cannot express (an MLP ``score_head``,
``mean`` or ``attention`` pooling, ``reward_attributes``) is refused before anything is written, with the reason and
the alternative, ``serve_rm.py``, which serves every head. The learnable scale (``learnable_reward_scale``) only
multiplies the training loss's logits, never the reward, so it does not block the export: its tensor
(``reward_scale.log_scale``) is left out and the exported config says ``learnable_reward_scale: false``.

The reward is the score at the end-of-turn token that closes the assistant turn (``<|im_end|>`` for Qwen). Qwen's
chat template puts a newline after every ``<|im_end|>``: the text vLLM scores must end at that token, or vLLM reads
the newline's score instead. ``reward_text`` renders that text for offline ``LLM.classify``; for the server,
``vlrm.use.clients.classify_request`` builds the ``/classify`` body that renders to it.

``--merge`` turns a vlrm LoRA checkpoint (``vlrm.model.checkpoints``: adapters + score head) into a full standalone
vlrm checkpoint: the base model with the adapters folded into its weights (``W + (alpha / r) B A``, peft's
``merge_and_unload``), the trained head, the reward model's config and the processor. Its rewards are the adapter
model's (to float round-off in float32; ``--dtype auto`` keeps the dtype the run trained in, where bf16 rounds the
merged weights once), and it loads, evaluates and exports like any full checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import save_file

from vlrm.data.rows import IMAGE_MARKER, user_prompt
from vlrm.layout.encoder import PreferenceEncoder
from vlrm.model.checkpoints import check_loadable, is_lora_checkpoint
from vlrm.model.families import family_of
from vlrm.model.heads import SCALE, vllm_head_problems
from vlrm.model.loading import load_checkpoint

PROCESSOR_FILES = (
    "processor_config.json", "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
    "added_tokens.json", "video_preprocessor_config.json", "generation_config.json",
)  # fmt: skip

VLLM_VERSION_CHECKED = "0.32.0"
HEAD = "score.weight"  # the head's name in a vlrm checkpoint (VLRewardModel.score, Linear(hidden, 1, bias=False))
DROPPED = (f"{SCALE}.",)  # tensors that do not change the reward and that vLLM would not load: left out
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class VllmRecipe:
    """How vLLM builds one family's classifier, and so what the export writes for it."""

    architecture: str  # config.architectures: the class vLLM resolves
    head: str  # the name vLLM's loader maps onto the classifier's head
    weight_prefixes: tuple[str, ...]  # the backbone's top-level tensor prefixes vLLM's weight mapper knows
    serve_flags: tuple[str, ...] = ("--runner", "pooling")
    checked: str = "float32, to 1e-5"  # how bench/check_vllm.py compared it with vlrm


VLLM_RECIPES = {
    "qwen2_vl": VllmRecipe("Qwen2VLForSequenceClassification", "language_model.score.weight", ("model.", "visual.")),
    "qwen2_5_vl": VllmRecipe(
        "Qwen2_5_VLForSequenceClassification", "language_model.score.weight", ("model.", "visual.")
    ),
    "qwen3_vl": VllmRecipe("Qwen3VLForSequenceClassification", HEAD, ("model.",)),
    "qwen3_5": VllmRecipe(
        "Qwen3_5ForConditionalGeneration", HEAD, ("model.",), ("--runner", "pooling", "--convert", "classify"),
        checked="bfloat16 only on the CPU build (its Gated DeltaNet kernel), to bfloat16 round-off",
    ),
}  # fmt: skip

VLLM_REFUSALS = {
    "qwen3_vl_moe": (
        "vLLM 0.32 reads Qwen3-VL-MoE's fused expert tensors in the original release's transposed layout ([experts, "
        "hidden, 2 x intermediate]) while transformers 5 (and so vlrm) saves them as [experts, 2 x intermediate, "
        "hidden], and it needs text_config.norm_topk_prob; the load fails on the expert shapes"
    ),
    "qwen3_5_moe": (
        "vLLM 0.32 resolves Qwen3_5MoeForSequenceClassification to its text-only Qwen3_5MoeForCausalLM (no vision "
        "tower), and Qwen3_5MoeForConditionalGeneration with --convert classify was not checked by running vLLM"
    ),
    "generic": (
        "the generic image-text-to-text path is not checked against vLLM: each family's vLLM classifier keeps its "
        "head and weights its own way, and an unchecked export could load and score differently"
    ),
}


def _image_count(prompt: list[dict]) -> int:
    return sum(
        part.get("type") == "image" for message in prompt if isinstance(message.get("content"), list)
        for part in message["content"]
    )  # fmt: skip


def reward_text(processor: Any, prompt: list[dict] | str, response: str, images: Sequence[Any] | int = ()) -> str:
    """The exact text whose last token carries the reward: the rendered prompt (one image placeholder per image, as
    ``RewardScorer.score`` places them: at ``<image>`` markers, else before the question), the response, the
    end-of-turn token and nothing after it. ``images``: the images sent with it (or their number). Send this text
    with the images to vLLM's offline ``LLM.classify``; raises ``ValueError`` when the prompt has places for another
    number of images than given (vLLM would fail, or score the text alone)."""
    num_images = images if isinstance(images, int) else len(images)
    encoder = PreferenceEncoder(processor)
    if isinstance(prompt, str):
        markers = prompt.count(IMAGE_MARKER)
        if markers and markers != num_images:
            raise ValueError(f"the question has {markers} {IMAGE_MARKER} markers for {num_images} images")
        prompt = user_prompt(prompt, num_images)
    elif _image_count(prompt) != num_images:
        raise ValueError(f"the prompt messages have {_image_count(prompt)} image parts for {num_images} images")
    return encoder.prompt_text(prompt) + response + encoder.end_of_turn


def weight_names(model_dir: Path) -> list[str]:
    names = []
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(file, "pt") as weights:
            names += list(weights.keys())
    return names


def _check_weights(checkpoint_dir: Path, recipe: VllmRecipe, hidden_size: int) -> None:
    """Refuse a checkpoint whose tensors vLLM would not map, each named: vLLM's classifier is the backbone and one
    ``Linear(hidden, 1)`` at the last token, so any other head, scale or generation weight would be dropped or
    rejected."""
    if not any(checkpoint_dir.glob("*.safetensors")):
        raise ValueError(f"{checkpoint_dir}: no safetensors weights; vLLM's export needs them (save with safetensors)")
    names = weight_names(checkpoint_dir)
    generation_head = [name for name in names if name.startswith("lm_head.") or ".lm_head." in name]
    if HEAD not in names or generation_head:
        raise ValueError(
            f"{checkpoint_dir}: not a vlrm reward checkpoint ({HEAD} present: {HEAD in names}; "
            f"generation head weights: {generation_head[:3]})"
        )
    unmapped = [name for name in names if name != HEAD and not name.startswith((*recipe.weight_prefixes, *DROPPED))]
    if unmapped:
        raise ValueError(
            f"{checkpoint_dir}: tensors vLLM's {recipe.architecture} would not load: {unmapped[:5]} (its classifier "
            f"is the backbone and one Linear(hidden, 1) head, {HEAD})"
        )
    file = next(file for file in sorted(checkpoint_dir.glob("*.safetensors")) if HEAD in weight_names_in(file))
    with safe_open(file, "pt") as weights:
        shape = weights.get_slice(HEAD).get_shape()
    if list(shape) != [1, hidden_size]:
        raise ValueError(f"{checkpoint_dir}: {HEAD} has shape {shape}, expected [1, {hidden_size}] (one reward)")


def weight_names_in(file: Path) -> list[str]:
    with safe_open(file, "pt") as weights:
        return list(weights.keys())


def _write_weights(checkpoint_dir: Path, output_dir: Path, head: str) -> None:
    """Copy the weight files; one holding the head (or a ``DROPPED`` tensor) is rewritten with the head under
    ``head`` and without those tensors (the other tensors and the file's metadata unchanged), and the index, when
    there is one, follows."""
    for file in sorted(checkpoint_dir.glob("*.safetensors")):
        names = weight_names_in(file)
        dropped = [name for name in names if name.startswith(DROPPED)]
        if not dropped and (head == HEAD or HEAD not in names):
            shutil.copy2(file, output_dir / file.name)
            continue
        with safe_open(file, "pt") as weights:
            metadata = weights.metadata()
            tensors = {
                (head if name == HEAD else name): weights.get_tensor(name) for name in names if name not in dropped
            }
        save_file(tensors, output_dir / file.name, metadata=metadata)
    if (checkpoint_dir / INDEX).is_file():
        index = json.loads((checkpoint_dir / INDEX).read_text())
        weight_map = index.get("weight_map", {})
        for name in [name for name in weight_map if name.startswith(DROPPED)]:
            del weight_map[name]
        if HEAD in weight_map:
            weight_map[head] = weight_map.pop(HEAD)
        (output_dir / INDEX).write_text(json.dumps(index, indent=2))


def export_for_vllm(checkpoint_dir: str | Path, output_dir: str | Path) -> Path:
    """Write ``output_dir``: the checkpoint's weights with the head where vLLM's loader for its family looks for it,
    a config naming the class vLLM builds (``VLLM_RECIPES``) and the processor. Raises ``ValueError`` for a family
    vLLM cannot serve (``VLLM_REFUSALS``, with the reason), a head it cannot express (``vllm_head_problems``: an MLP,
    mean / attention pooling, attributes), a checkpoint without a score head or with tensors vLLM would not load, or
    an ``output_dir`` that already holds a model; ``CheckpointError`` for a dir that cannot load."""
    checkpoint_dir, output_dir = Path(checkpoint_dir), Path(output_dir)
    check_loadable(checkpoint_dir)
    if (checkpoint_dir / "adapter_config.json").is_file() and not any(checkpoint_dir.glob("model*.safetensors")):
        raise ValueError(
            f"{checkpoint_dir}: a LoRA checkpoint (adapter + head, no base weights); merge it first: python -m "
            f"vlrm export --merge {checkpoint_dir} MERGED_DIR, then python -m vlrm export MERGED_DIR {output_dir}"
        )
    from transformers import AutoConfig, AutoProcessor

    model_config = AutoConfig.from_pretrained(checkpoint_dir)
    family = family_of(model_config)
    if family.name in VLLM_REFUSALS or family.name not in VLLM_RECIPES:
        reason = VLLM_REFUSALS.get(family.name, "no vLLM recipe for this family")
        raise ValueError(
            f"{checkpoint_dir}: {family.title} cannot be exported for vLLM {VLLM_VERSION_CHECKED}: {reason}. "
            f"Exported families: {', '.join(sorted(VLLM_RECIPES))}; serve this one with serve_rm.py"
        )
    recipe = VLLM_RECIPES[family.name]
    head_problems = vllm_head_problems(model_config)
    if head_problems:
        raise ValueError(
            f"{checkpoint_dir}: its head cannot be exported for vLLM {VLLM_VERSION_CHECKED}: "
            f"{'; '.join(head_problems)}. vLLM's sequence-classification runner is the backbone and one "
            f"Linear(hidden, 1) read at the last token, and would score differently; serve this checkpoint with "
            f"serve_rm.py (python serve_rm.py {checkpoint_dir}), which runs every head"
        )
    if output_dir.resolve() == checkpoint_dir.resolve():
        raise ValueError(f"{output_dir}: the export must go to another dir than the checkpoint")
    if any(output_dir.glob("*.safetensors")) or (output_dir / "config.json").exists():
        # vLLM loads every *.safetensors in a model dir: a stale shard left there would load too.
        raise ValueError(f"{output_dir}: already holds a model; export to a new dir or delete it first")
    text_config = model_config.get_text_config()
    _check_weights(checkpoint_dir, recipe, text_config.hidden_size)

    reward_token = PreferenceEncoder(AutoProcessor.from_pretrained(checkpoint_dir)).end_of_turn
    config = json.loads((checkpoint_dir / "config.json").read_text())
    labels = {"num_labels": 1, "id2label": {"0": "reward"}, "label2id": {"reward": 0}, "problem_type": "regression"}
    config.update(architectures=[recipe.architecture], **labels)
    if config.get("learnable_reward_scale"):  # its tensor is left out (DROPPED): the reward never reads it
        config["learnable_reward_scale"] = False
    config.setdefault("text_config", {}).update(labels)
    config["vlrm"] = {
        "reward_token": reward_token,
        "note": f"the text must end at the reward token: drop what the chat template writes after {reward_token}",
        "reward_mean": config.get("reward_mean"),
        "reward_std": config.get("reward_std"),
        "vllm": {
            "version_checked": VLLM_VERSION_CHECKED,
            "serve_flags": list(recipe.serve_flags),
            "head": recipe.head,
            "checked": recipe.checked,
        },
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    _write_weights(checkpoint_dir, output_dir, recipe.head)
    (output_dir / "config.json").write_text(json.dumps(config, indent=2))
    for file in checkpoint_dir.iterdir():
        if file.name in PROCESSOR_FILES:
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
    exported = export_for_vllm(arguments.checkpoint_dir, arguments.output_dir)
    flags = " ".join(json.loads((exported / "config.json").read_text())["vlrm"]["vllm"]["serve_flags"])
    print(f"exported for vLLM's pooling runner: {exported}")
    print(f"serve it: python -m vllm.entrypoints.openai.api_server --model {exported} {flags}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
