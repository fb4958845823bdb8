"""Padded vs packed layout: same random weights, same pairs; a training step and scoring, side by side.

Speed: per mode, one subprocess runs the two layouts step by step in turn on the same micro-batches (on a shared
machine the load changes within seconds; interleaving exposes both layouts to the same load); pairs/s from the median
step. Peak memory: one subprocess per (layout, mode), so that peaks are comparable (CPU: ru_maxrss of the process;
GPU: torch.cuda.max_memory_allocated). The layouts must agree: after the timed steps of the first mode, both score
the first micro-batch (eval mode) and the largest reward difference is reported (float32: at most 1e-3, or the run
fails). Prints a table, then one JSON line.

    python bench/bench_packing.py                      # CPU default: mid-size Qwen2.5-VL, ~1000 visual tokens
    python bench/bench_packing.py --irrelevant 1       # + one irrelevant branch per pair, partners in the batch
    python bench/bench_packing.py --family qwen3_vl    # any family with the packed layout (FAMILY_PRESETS)
    python bench/bench_packing.py --device cuda --attn flash_attention_2 --dtype bfloat16 --preset 3b

Families: qwen2_vl, qwen2_5_vl (default), qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe; presets ``mid`` (CPU-sized)
and ``3b`` (the ~3-4B class of the family: its real layer shapes, random weights; not for the Qwen3.5 families).

Ideal ratio = language-model tokens the padded layout computes / tokens the packed layout computes. The packed
layout also runs each image through the vision tower once instead of once per branch, so the achieved ratio can
exceed it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAIR_FIELDS = ("num_pairs", "num_irrelevant", "margin")
DEFAULT_FAMILY = "qwen2_5_vl"
REWARD_TOLERANCE = {"float32": 1e-3}  # max |packed - padded| reward; half precision: reported, not worker_info

# Shapes per family (random weights). "text" goes to the language model's config, "vision" to the vision tower's,
# under the names of the family's config.json; the tower's output width is set to the text hidden size. Text:
# head_dim is hidden_size / num_attention_heads unless given; mrope_section (head_dim / 2 frequencies over time,
# height, width) goes into rope_parameters, interleaved for Qwen3-VL as the tiny config sets it. Everything else
# (vocabulary: the tiny tokenizer's ~400 tokens, so no preset carries the real 152k-token embedding; rope_theta;
# patch and merge sizes; special token ids) comes from vlrm.tiny.qwen's config of the family. "3b": the ~3-4B class.

# Qwen2.5-VL-3B-Instruct's shapes (random weights); "tiny": the test suite's tiny model (bench/gpu_check.py --smoke).
PRESETS = {
    "tiny": {
        "text": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "intermediate_size": 128, "mrope_section": [2, 3, 3]},
        "vision": {"depth": 2, "hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "fullatt_block_indexes": [1]},
    },
    "mid": {
        "text": {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "intermediate_size": 1024, "mrope_section": [8, 12, 12]},
        "vision": {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256,
                   "fullatt_block_indexes": [1]},
    },
    "3b": {
        "text": {"hidden_size": 2048, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
                 "intermediate_size": 11008, "mrope_section": [16, 24, 24]},
        "vision": {"depth": 32, "hidden_size": 1280, "num_heads": 16, "intermediate_size": 3420,
                   "fullatt_block_indexes": [7, 15, 23, 31]},
    },
}  # fmt: skip

# Qwen2-VL-2B-Instruct (the family has no 3B): the tower's width is embed_dim, its MLP embed_dim x mlp_ratio.
QWEN2_VL_PRESETS = {
    "mid": {
        "text": {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "intermediate_size": 1024, "mrope_section": [8, 12, 12]},
        "vision": {"depth": 2, "embed_dim": 128, "num_heads": 2, "mlp_ratio": 2},
    },
    "3b": {
        "text": {"hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
                 "intermediate_size": 8960, "mrope_section": [16, 24, 24]},
        "vision": {"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4},
    },
}  # fmt: skip

# Qwen3-VL-4B-Instruct: interleaved mRoPE [24, 20, 20] of head_dim 128's 64 frequencies; a 24-block ViT with a
# learned 48 x 48 position grid, DeepStack features from blocks 5, 11, 17.
QWEN3_VL_PRESETS = {
    "mid": {
        "text": {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "head_dim": 64, "intermediate_size": 1024, "mrope_section": [12, 10, 10]},
        "vision": {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": [0, 1]},
    },
    "3b": {
        "text": {"hidden_size": 2560, "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
                 "head_dim": 128, "intermediate_size": 9728, "mrope_section": [24, 20, 20]},
        "vision": {"depth": 24, "hidden_size": 1024, "num_heads": 16, "intermediate_size": 4096,
                   "num_position_embeddings": 2304, "deepstack_visual_indexes": [5, 11, 17]},
    },
}  # fmt: skip

# Qwen3-VL-30B-A3B-Instruct's per-layer text shapes (128 experts of width 768, 8 per token, every layer sparse) with
# 6 of its 48 decoder layers, so that the model stays in the ~4B class of the other 3b presets (~3.6B in the
# experts). The real 30B-A3B's vision tower is, as far as I know, the larger 27-block, 1152-wide one of Qwen3-VL-8B
# (unverified here); this preset uses the 4B's tower. mid: the dense mid with 8 experts of half its MLP width, 2 per
# token (the same MLP compute per token as the dense mid).
QWEN3_VL_MOE_PRESETS = {
    "mid": {
        "text": {**QWEN3_VL_PRESETS["mid"]["text"], "num_experts": 8, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 512},
        "vision": QWEN3_VL_PRESETS["mid"]["vision"],
    },
    "3b": {
        "text": {"hidden_size": 2048, "num_hidden_layers": 6, "num_attention_heads": 32, "num_key_value_heads": 4,
                 "head_dim": 128, "intermediate_size": 6144, "mrope_section": [24, 20, 20], "num_experts": 128,
                 "num_experts_per_tok": 8, "moe_intermediate_size": 768},
        "vision": QWEN3_VL_PRESETS["3b"]["vision"],
    },
}  # fmt: skip

# Qwen3.5, CPU-sized only (no hub access here to read a real checkpoint's shapes): 3 Gated DeltaNet layers and 1
# gated attention layer, Qwen3.5's 3:1; a quarter of head_dim rotary (Qwen3.5's partial_rotary_factor), interleaved.
QWEN3_5_PRESETS = {
    "mid": {
        "text": {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "head_dim": 64, "intermediate_size": 1024, "mrope_section": [3, 3, 2], "partial_rotary_factor": 0.25,
                 "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 64,
                 "linear_value_head_dim": 64},
        "vision": {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256,
                   "num_position_embeddings": 2304},
    },
}  # fmt: skip

# Qwen3.5-MoE: the Qwen3.5 mid with 8 routed experts of half its MLP width, 2 per token, and the shared expert.
QWEN3_5_MOE_PRESETS = {
    "mid": {
        "text": {**QWEN3_5_PRESETS["mid"]["text"], "num_experts": 8, "num_experts_per_tok": 2,
                 "moe_intermediate_size": 512, "shared_expert_intermediate_size": 512},
        "vision": QWEN3_5_PRESETS["mid"]["vision"],
    },
}  # fmt: skip

# Every family with the packed layout (vlrm.families: packed=True). PRESETS is Qwen2.5-VL's (bench_memory.py adds to
# it; bench_serve.py reads it).
FAMILY_PRESETS = {
    "qwen2_vl": QWEN2_VL_PRESETS,
    "qwen2_5_vl": PRESETS,
    "qwen3_vl": QWEN3_VL_PRESETS,
    "qwen3_vl_moe": QWEN3_VL_MOE_PRESETS,
    "qwen3_5": QWEN3_5_PRESETS,
    "qwen3_5_moe": QWEN3_5_MOE_PRESETS,
}
# The vision config key of the tower's output width (the text hidden size).
VISION_OUTPUT_KEY = {"qwen2_vl": "hidden_size"}  # others: out_hidden_size
TOKEN_ID_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")

WORDS = "the shapes are red green blue yellow circle one two three image picture answer question yes no".split()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default=DEFAULT_FAMILY, help=f"one of {', '.join(FAMILY_PRESETS)}")
    parser.add_argument("--preset", choices=sorted({name for presets in FAMILY_PRESETS.values() for name in presets}),
                        default="mid", help="mid: CPU-sized; 3b: the ~3-4B class of the family")  # fmt: skip
    parser.add_argument("--pairs", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--irrelevant", type=int, default=0, help="irrelevant branches per pair, from the same batch")
    parser.add_argument("--visual_tokens", type=int, default=1000, help="merged visual tokens per image (about)")
    parser.add_argument("--images", type=int, default=1, help="images per prompt")
    parser.add_argument("--question_tokens", type=int, default=40)
    parser.add_argument("--min_response_tokens", type=int, default=64)
    parser.add_argument("--max_response_tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (micro-batches) per layout and mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--modes", default="train,score")
    parser.add_argument("--layouts", default="padded,packed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # time|memory, mode, layout(s)
    args = parser.parse_args(argv)
    family_error = check_family(args.family)
    if family_error:
        parser.error(family_error)
    if args.preset not in FAMILY_PRESETS[args.family]:
        parser.error(f"--preset {args.preset}: {args.family} has {sorted(FAMILY_PRESETS[args.family])}")
    return args


def check_family(name: str) -> str | None:
    """Why ``name`` cannot run here, or None: the bench compares the two layouts, so it needs the packed one."""
    if name in FAMILY_PRESETS:
        return None
    from vlrm.model.families import FAMILIES, GENERIC, family_named

    packed = ", ".join(FAMILY_PRESETS)
    try:
        family = family_named(name)
    except ValueError as error:
        return f"--family {name}: {error}. This bench runs the families with the packed layout: {packed}"
    padded_only = ", ".join(other.name for other in (*FAMILIES, GENERIC) if not other.packed)
    return (
        f"--family {name} ({family.title}): no packed layout ({family.padded_reason}). This bench compares the "
        f"padded and packed layouts, so it runs the packed families only: {packed}; padded only: {padded_only}"
    )


def family_of(args) -> str:
    """The family of ``args``: bench_memory.py and bench_serve.py build their arguments without one."""
    return getattr(args, "family", DEFAULT_FAMILY)


# ----------------------------------------------------------------------------------------------------------------------
# Model, processor and pairs: all deterministic from the arguments, so every subprocess sees the same ones


def merged_token_pixels(family: str) -> int:
    """The side in pixels of one merged visual token: patch (14 for Qwen2/2.5-VL, 16 for Qwen3-VL) x merge 2."""
    from vlrm.tiny.qwen import PATCH_SIZES

    return PATCH_SIZES[family] * 2


def build_processor(args):
    from vlrm.tiny.qwen import build_processor as tiny_processor
    from vlrm.tiny.qwen import build_tokenizer

    family = family_of(args)
    processor = tiny_processor(build_tokenizer(), family)
    block = merged_token_pixels(family)  # room for the requested visual tokens
    processor.image_processor.size = {
        "shortest_edge": block * block,
        "longest_edge": block * block * (args.visual_tokens + 128),
    }
    return processor


def preset_shapes(config_class, preset: dict) -> tuple[dict, dict]:
    """(text, vision) shapes of a preset under the config's own attribute names (Qwen3-VL-MoE's num_experts is
    num_local_experts), so that they replace the tiny config's values rather than sit next to them."""
    text_aliases = config_class.sub_configs["text_config"].attribute_map
    vision_aliases = config_class.sub_configs["vision_config"].attribute_map
    text = {text_aliases.get(key, key): value for key, value in preset["text"].items()}
    vision = {vision_aliases.get(key, key): value for key, value in preset["vision"].items()}
    return text, vision


def text_config_of(tiny_text: dict, shapes: dict) -> dict:
    """The tiny language model's config with the preset's shapes."""
    rope_keys = ("mrope_section", "partial_rotary_factor")
    text = dict(tiny_text, **{key: value for key, value in shapes.items() if key not in rope_keys})
    text.pop("layer_types", None)  # recomputed from num_hidden_layers (Qwen3.5: every 4th layer full attention)
    # Set here, or the tiny config's head_dim would stay: Qwen3-VL's attention reads it, and so does Qwen2/2.5-VL's
    # rotary embedding (whose attention uses hidden_size / num_attention_heads).
    text["head_dim"] = shapes.get("head_dim", shapes["hidden_size"] // shapes["num_attention_heads"])
    rope = dict(text["rope_parameters"], **{key: shapes[key] for key in rope_keys if key in shapes})
    rotary_dim = int(text["head_dim"] * rope.get("partial_rotary_factor", 1.0))
    if 2 * sum(rope["mrope_section"]) != rotary_dim:
        raise ValueError(f"mrope_section {rope['mrope_section']} must cover the {rotary_dim // 2} rotary frequencies")
    text["rope_parameters"] = rope
    text["initializer_range"] = 0.02
    return text


def build_config(args, tokenizer):
    """A config of the family with the preset's shapes; special token ids, patch and merge sizes from the tiny one."""
    from vlrm.tiny.qwen import QWEN_FAMILIES, build_tiny_config

    family = family_of(args)
    config_class = QWEN_FAMILIES[family][0]
    tiny = build_tiny_config(tokenizer, family=family).to_dict()
    text_shapes, vision_shapes = preset_shapes(config_class, FAMILY_PRESETS[family][args.preset])
    text = text_config_of(tiny["text_config"], text_shapes)
    vision = dict(tiny["vision_config"], **vision_shapes, initializer_range=0.02)
    vision.pop("out_hidden_size", None)  # the tiny config writes it for every family; Qwen2-VL reads hidden_size
    vision[VISION_OUTPUT_KEY.get(family, "out_hidden_size")] = text["hidden_size"]
    return config_class(
        **{key: tiny[key] for key in TOKEN_ID_KEYS},
        text_config=text,
        vision_config=vision,
        initializer_range=0.02,
        attn_implementation=args.attn,
    )


def build_model(args, tokenizer):
    import torch

    from vlrm.model.reward_model import VLRewardModel

    config = build_config(args, tokenizer)
    torch.manual_seed(args.seed)  # the same weights in every subprocess (on the same device)
    with torch.device(args.device):
        model = VLRewardModel._from_config(config, dtype=getattr(torch, args.dtype), attn_implementation=args.attn)
    return model


def token_text(tokenizer, rng, num_tokens: int) -> str:
    """Text of about ``num_tokens`` tokens."""
    words = " ".join(rng.choice(WORDS) for _ in range(num_tokens))
    ids = tokenizer(words, add_special_tokens=False)["input_ids"][:num_tokens]
    return tokenizer.decode(ids)


def build_micro_batches(args, tokenizer) -> list[list[dict]]:
    import random

    import numpy as np
    from PIL import Image

    rng = random.Random(args.seed)
    side, block = math.isqrt(args.visual_tokens), merged_token_pixels(family_of(args))
    width, height = block * math.ceil(args.visual_tokens / side), block * side
    batches = []
    for _ in range(args.warmup + args.steps):
        rows = []
        for _ in range(args.pairs):
            images = [
                Image.fromarray(
                    np.random.default_rng(rng.randrange(2**31)).integers(0, 256, (height, width, 3), np.uint8)
                )
                for _ in range(args.images)
            ]
            question = token_text(tokenizer, rng, args.question_tokens)
            content = [{"type": "image", "text": None} for _ in images] + [{"type": "text", "text": question}]
            response_tokens = [rng.randint(args.min_response_tokens, args.max_response_tokens) - 1 for _ in range(2)]
            rows.append(
                {
                    "prompt": [{"role": "user", "content": content}],
                    "images": images,
                    "chosen": token_text(tokenizer, rng, response_tokens[0]),
                    "rejected": token_text(tokenizer, rng, response_tokens[1]),
                }
            )
        for index, row in enumerate(rows):  # partners from the same micro-batch, as the irrelevant sampler draws them
            partners = [rows[(index + 1 + k) % len(rows)] for k in range(args.irrelevant)]
            row["irrelevant"] = [
                {"prompt": other["prompt"], "images": [image.copy() for image in other["images"]]}
                for other in partners
            ]
        batches.append(rows)
    return batches


# ----------------------------------------------------------------------------------------------------------------------
# Workers: timing (both layouts interleaved, one process) and peak memory (one layout per process)


def peak_memory_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def setup(args, mode: str):
    import torch

    from vlrm.layout.attention import enable_packed_attention
    from vlrm.layout.encoder import PreferenceEncoder
    from vlrm.layout.packed import PackedPreferenceCollator
    from vlrm.layout.padded import PaddedPreferenceCollator

    torch.set_num_threads(args.threads)
    processor = build_processor(args)
    encoder = PreferenceEncoder(processor)
    model = build_model(args, processor.tokenizer)
    enable_packed_attention(model)  # the padded layout runs the standard attention on an enabled model
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(mode == "train")
    collators = {"padded": PaddedPreferenceCollator(encoder), "packed": PackedPreferenceCollator(encoder)}
    return model, collators, build_micro_batches(args, processor.tokenizer)


def to_device(batch: dict, model, device) -> dict:
    """The model's inputs of a collated batch: tensors on ``device``, floating ones in the model's dtype."""
    import torch

    inputs = {}
    for key, value in batch.items():
        if key in PAIR_FIELDS:
            continue
        if torch.is_tensor(value):
            value = value.to(device, dtype=model.dtype if value.is_floating_point() else None)
        inputs[key] = value
    return inputs


def make_step(args, model, mode: str):
    import torch
    import torch.nn.functional as F

    from vlrm.layout.padded import split_rewards

    device = torch.device(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6) if mode == "train" else None

    def step(batch) -> float:
        """Seconds for one step: forward (+ backward + AdamW step when training)."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        inputs = to_device(batch, model, device)
        if mode == "score":
            with torch.inference_mode():
                model(**inputs).rewards.float().cpu()
        else:
            rewards = model(**inputs).rewards
            chosen, rejected, irrelevant = split_rewards(rewards, batch["num_pairs"], batch["num_irrelevant"])
            loss = -F.logsigmoid(chosen - rejected).mean()
            if irrelevant.numel():
                loss = loss - F.logsigmoid(chosen[:, None] - irrelevant).mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return step


def reward_difference(args, model, collators, rows) -> float:
    """Max |packed - padded| reward over one micro-batch, both scored in eval mode: the layouts must agree."""
    import torch

    device, training = torch.device(args.device), model.training
    batches = [collators[layout](rows) for layout in ("padded", "packed")]  # collated outside inference mode
    model.eval()
    with torch.inference_mode():
        padded, packed = (model(**to_device(batch, model, device)).rewards.float().cpu() for batch in batches)
    model.train(training)
    return (packed - padded).abs().max().item()


def timing_worker(args, mode: str, layouts: list[str]) -> dict:
    """Both layouts in one process, step by step in turn: on a shared machine the load changes within seconds, and
    interleaving exposes both layouts to the same load. After the first mode's steps, the layouts' rewards on the
    first micro-batch are compared (``reward_max_abs_diff``)."""
    import statistics

    model, collators, micro_batches = setup(args, mode)
    step = make_step(args, model, mode)
    seconds = {layout: [] for layout in layouts}
    tokens = {layout: [0, 0] for layout in layouts}
    for index, rows in enumerate(micro_batches):
        for layout in layouts if index % 2 == 0 else layouts[::-1]:
            batch = collators[layout](rows)
            elapsed = step(batch)
            if index >= args.warmup:
                seconds[layout].append(elapsed)
                tokens[layout][0] += batch["input_ids"].numel()
                tokens[layout][1] += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    compare = mode == args.modes.split(",")[0] and {"padded", "packed"} <= set(layouts)
    timings = {
        layout: {
            "pairs_per_s": args.pairs / statistics.median(seconds[layout]),
            "step_s_median": statistics.median(seconds[layout]),
            "step_s_min": min(seconds[layout]),
            "step_s_all": [round(value, 3) for value in seconds[layout]],
            "lm_tokens": tokens[layout][0] // args.steps,
            "vision_patches": tokens[layout][1] // args.steps,
        }
        for layout in layouts
    }
    return {
        "timings": timings,
        "parameters": sum(parameter.numel() for parameter in model.parameters()),
        "reward_max_abs_diff": reward_difference(args, model, collators, micro_batches[0]) if compare else None,
    }


def memory_worker(args, mode: str, layout: str) -> dict:
    model, collators, micro_batches = setup(args, mode)
    step = make_step(args, model, mode)
    for rows in micro_batches[: args.warmup + 1]:
        step(collators[layout](rows))
    return {"peak_mem_mib": peak_memory_mib(next(model.parameters()).device)}


# ----------------------------------------------------------------------------------------------------------------------
# Driver


def run_worker(argv: list[str], *worker: str, script: str = __file__) -> dict:
    """``script --worker ...`` in a fresh process (its peak RSS is its own); the last stdout line is its JSON."""
    completed = subprocess.run([sys.executable, script, *argv, "--worker", *worker], capture_output=True, text=True)
    if completed.returncode:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"worker {' '.join(worker)} failed")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def print_table(args, results: dict) -> None:
    header = (
        f"{'family':<12} {'mode':<6} {'layout':<7} {'pairs/s':>8} {'step s':>7} {'best s':>7} {'LM tokens':>10} "
        f"{'vision patches':>15} {'peak MiB':>9}"
    )
    print(header)
    print("-" * len(header))
    for (layout, mode), result in results.items():
        print(
            f"{args.family:<12} {mode:<6} {layout:<7} {result['pairs_per_s']:>8.3f} {result['step_s_median']:>7.2f} "
            f"{result['step_s_min']:>7.2f} {result['lm_tokens']:>10} {result['vision_patches']:>15} "
            f"{result['peak_mem_mib']:>9.0f}"
        )


def mode_summary(mode: str, padded: dict, packed: dict) -> dict:
    """The packed/padded ratios of one mode; prints them."""
    speedup = packed["pairs_per_s"] / padded["pairs_per_s"]
    best_speedup = padded["step_s_min"] / packed["step_s_min"]
    ideal = padded["lm_tokens"] / packed["lm_tokens"]
    memory = packed["peak_mem_mib"] / padded["peak_mem_mib"]
    print(
        f"{mode}: packed/padded speed {speedup:.2f}x (median steps; best steps {best_speedup:.2f}x), ideal "
        f"(LM tokens) {ideal:.2f}x, achieved/ideal {speedup / ideal:.0%}, peak memory packed/padded {memory:.2f}"
    )
    return {
        "padded": padded,
        "packed": packed,
        "speedup": round(speedup, 3),
        "speedup_best_steps": round(best_speedup, 3),
        "ideal_lm_token_ratio": round(ideal, 3),
        "achieved_over_ideal": round(speedup / ideal, 3),
        "vision_patch_ratio": round(padded["vision_patches"] / max(packed["vision_patches"], 1), 3),
        "peak_mem_ratio": round(memory, 3),
    }


def layout_check(args, difference: float | None) -> dict:
    """Whether the layouts' rewards agreed on the first micro-batch; prints it."""
    tolerance = REWARD_TOLERANCE.get(args.dtype)
    if difference is None:
        print("layouts: not compared (needs both layouts)")
        return {"reward_max_abs_diff": None, "tolerance": tolerance, "agree": None}
    agree = None if tolerance is None else difference <= tolerance
    verdict = {True: "agree", False: "DISAGREE", None: "not worker_info in half precision"}[agree]
    print(f"layouts {verdict}: max |packed - padded| reward on the first micro-batch {difference:.2e} "
          f"(tolerance {tolerance})")  # fmt: skip
    return {"reward_max_abs_diff": difference, "tolerance": tolerance, "agree": agree}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        kind, mode, layouts = args.worker
        if kind == "time":
            print(json.dumps(timing_worker(args, mode, layouts.split(","))))
        else:
            print(json.dumps(memory_worker(args, mode, layouts)))
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    layouts, results, worker_info = args.layouts.split(","), {}, {}
    for mode in args.modes.split(","):
        timing = run_worker(argv, "time", mode, args.layouts)
        worker_info.setdefault("parameters", timing["parameters"])
        worker_info.setdefault("reward_max_abs_diff", timing["reward_max_abs_diff"])
        for layout in layouts:
            results[(layout, mode)] = dict(timing["timings"][layout], **run_worker(argv, "memory", mode, layout))

    print(f"family {args.family}, preset {args.preset}: {worker_info['parameters'] / 1e6:.1f}M parameters")
    print_table(args, results)
    summary = {
        "family": args.family,
        "parameters": worker_info["parameters"],
        "config": {key: value for key, value in vars(args).items() if key != "worker"},
        "results": {},
    }
    for mode in args.modes.split(","):
        padded, packed = results.get(("padded", mode)), results.get(("packed", mode))
        if padded and packed:
            summary["results"][mode] = mode_summary(mode, padded, packed)
    summary["layouts"] = layout_check(args, worker_info["reward_max_abs_diff"])
    print(json.dumps(summary))
    if summary["layouts"]["agree"] is False:
        raise SystemExit(f"the packed and padded rewards differ by {worker_info['reward_max_abs_diff']:.2e}")


if __name__ == "__main__":
    main()
