"""Full fine-tuning vs LoRA on the same model: peak memory and step time, side by side in one run.

Both modes (``full``, ``lora``) train the same random weights on the same packed micro-batches with the same AdamW
step as training; LoRA is applied as train_rm.py applies it (``vlrm.lora.apply_lora``: rank ``--lora_r`` adapters on
every language-model linear layer, the score head trained in full, the rest frozen). Step time: one subprocess runs
the two modes step by step in turn (on a shared machine the load changes within seconds; interleaving exposes both to
the same load), median step. Peak memory: one subprocess per mode, so that each peak is that mode's alone (CPU: the
process's peak RSS, ru_maxrss, imports included; GPU: torch.cuda.max_memory_allocated). Each mode also reports the
bytes of its weights, gradients and optimizer state as tensors (what LoRA saves, whatever the allocator keeps).
Prints a table, then one JSON line.

    python bench/bench_memory.py                                # CPU: a 92M-parameter model, 128 visual tokens
    python bench/bench_memory.py --lora_r 64 --gradient_checkpointing
    python bench/bench_memory.py --device cuda --dtype bfloat16 --attn flash_attention_2 --preset 3b

``--shapes`` prints the arithmetic for the real Qwen2.5-VL 7B / 32B / 72B instead: parameters, LoRA parameters and
the memory of weights, gradients and AdamW state in DeepSpeed's mixed precision, computed by building each model on
PyTorch's meta device (shapes only: no weights, no download) and applying LoRA to it.

    python bench/bench_memory.py --shapes --shape_ranks 16,64
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_packing  # noqa: E402  (its random Qwen2.5-VL builder and synthetic micro-batches)

PAIR_FIELDS = ("num_pairs", "num_irrelevant", "margin")

# A language model large enough for its weights and optimizer state to show next to the activations on a CPU.
bench_packing.PRESETS["small"] = {
    "text": {"hidden_size": 1024, "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 4,
             "intermediate_size": 2816, "mrope_section": [8, 12, 12]},
    "vision": {"depth": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 256, "fullatt_block_indexes": [1]},
}  # fmt: skip

# Qwen2.5-VL's published shapes (the config.json of Qwen/Qwen2.5-VL-{7B,32B,72B}-Instruct). The vision tower is the
# same ViT in every size; its merger projects to the language model's hidden size.
REAL_TEXT_SHAPES = {
    "7B": {"hidden_size": 3584, "num_hidden_layers": 28, "intermediate_size": 18944, "num_attention_heads": 28,
           "num_key_value_heads": 4},
    "32B": {"hidden_size": 5120, "num_hidden_layers": 64, "intermediate_size": 27648, "num_attention_heads": 40,
            "num_key_value_heads": 8},
    "72B": {"hidden_size": 8192, "num_hidden_layers": 80, "intermediate_size": 29568, "num_attention_heads": 64,
            "num_key_value_heads": 8},
}  # fmt: skip
REAL_VISION_SHAPES = {
    "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31],
}  # fmt: skip
VOCAB_SIZE = 152064
# DeepSpeed mixed precision (bf16): bf16 weights (2 bytes) and gradients (2), fp32 master weights (4) and AdamW's
# two moments (4 + 4) per trained parameter; a frozen parameter only has its bf16 weight.
TRAINED_BYTES, FROZEN_BYTES = 2 + 2 + 4 + 8, 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(bench_packing.PRESETS), default="small")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    parser.add_argument("--modes", default="full,lora")
    parser.add_argument("--pairs", type=int, default=2, help="pairs per micro-batch")
    parser.add_argument("--visual_tokens", type=int, default=128, help="merged visual tokens per image (about)")
    parser.add_argument("--question_tokens", type=int, default=40)
    parser.add_argument("--min_response_tokens", type=int, default=32)
    parser.add_argument("--max_response_tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per mode")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--attn", choices=["sdpa", "eager", "flash_attention_2"], default="sdpa")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", action="store_true", help="print the 7B/32B/72B arithmetic instead (meta device)")
    parser.add_argument("--shape_ranks", default="16,64", help="LoRA ranks for --shapes")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)  # time MODES | memory MODE
    return parser.parse_args(argv)


def tensor_bytes(tensors) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


# ----------------------------------------------------------------------------------------------------------------------
# Workers: step time (both modes interleaved, one process) and peak memory (one mode per process)


def setup(args):
    import torch

    from vlrm.layout.encoder import PreferenceEncoder
    from vlrm.layout.packed import PackedPreferenceCollator

    torch.set_num_threads(args.threads)
    packing_args = argparse.Namespace(**vars(args), images=1, irrelevant=0)
    processor = bench_packing.build_processor(packing_args)
    collator = PackedPreferenceCollator(PreferenceEncoder(processor))
    micro_batches = [collator(rows) for rows in bench_packing.build_micro_batches(packing_args, processor.tokenizer)]
    return packing_args, processor, micro_batches


def build_mode(args, packing_args, processor, mode: str):
    """The random model (the same weights for every mode: bench_packing seeds it) as ``mode`` trains it, and its
    AdamW over the trainable parameters."""
    import torch

    from vlrm.layout.attention import enable_packed_attention
    from vlrm.model.lora import LoraArguments, apply_lora

    model = bench_packing.build_model(packing_args, processor.tokenizer)
    enable_packed_attention(model)
    if mode == "lora":
        model = apply_lora(model, LoraArguments(use_lora=True, lora_r=args.lora_r, lora_alpha=args.lora_alpha))
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    return model, optimizer


def train_step(model, optimizer, batch, device) -> float:
    """Seconds of one optimizer step: forward, Bradley-Terry loss, backward, AdamW."""
    import torch
    import torch.nn.functional as F

    from vlrm.layout.padded import split_rewards

    inputs = bench_packing.to_device(batch, model, device)  # the packed layout moves itself in the forward
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    chosen, rejected, _ = split_rewards(model(**inputs).rewards, batch["num_pairs"], batch["num_irrelevant"])
    (-F.logsigmoid(chosen - rejected).mean()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)  # gradients stay allocated, as between the steps of a real run
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def timing_worker(args, modes: list[str]) -> dict:
    """Every mode in one process, step by step in turn: on a shared machine the load changes within seconds, and
    interleaving exposes every mode to the same load."""
    import statistics

    import torch

    device = torch.device(args.device)
    packing_args, processor, micro_batches = setup(args)
    models = {mode: build_mode(args, packing_args, processor, mode) for mode in modes}
    seconds = {mode: [] for mode in modes}
    for index, batch in enumerate(micro_batches):
        for mode in modes if index % 2 == 0 else modes[::-1]:
            elapsed = train_step(*models[mode], batch, device)
            if index >= args.warmup:
                seconds[mode].append(elapsed)
    return {
        mode: {
            "step_s_median": statistics.median(seconds[mode]),
            "step_s_min": min(seconds[mode]),
            "step_s_all": [round(value, 3) for value in seconds[mode]],
            "lm_tokens": sum(batch["input_ids"].numel() for batch in micro_batches) // len(micro_batches),
        }
        for mode in modes
    }


def memory_worker(args, mode: str) -> dict:
    import torch

    from vlrm.model.lora import count_parameters

    device = torch.device(args.device)
    packing_args, processor, micro_batches = setup(args)
    model, optimizer = build_mode(args, packing_args, processor, mode)
    for batch in micro_batches[: args.warmup + 1]:  # the optimizer state exists from the first step on
        train_step(model, optimizer, batch, device)
    trainable, total = count_parameters(model)
    gradients = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    optimizer_state = [
        value for state in optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    ]
    return {
        "parameters": total,
        "trainable": trainable,
        "weights_mib": tensor_bytes(model.parameters()) / 2**20,
        "gradients_mib": tensor_bytes(gradients) / 2**20,
        "optimizer_state_mib": tensor_bytes(optimizer_state) / 2**20,
        "peak_mem_mib": bench_packing.peak_memory_mib(device),
    }


# ----------------------------------------------------------------------------------------------------------------------
# --shapes: the real models' arithmetic, on the meta device


def real_model_rows(ranks: list[int]) -> list[dict]:
    import torch
    from transformers import Qwen2_5_VLConfig

    from vlrm.model.lora import LoraArguments, apply_lora, count_parameters
    from vlrm.model.reward_model import VLRewardModel

    rows = []
    for name, text in REAL_TEXT_SHAPES.items():
        head_dim = text["hidden_size"] // text["num_attention_heads"]
        config = Qwen2_5_VLConfig(
            text_config=dict(
                text,
                vocab_size=VOCAB_SIZE,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
            ),
            vision_config=dict(REAL_VISION_SHAPES, out_hidden_size=text["hidden_size"]),
        )
        assert head_dim == 128, name  # mrope_section [16, 24, 24] covers head_dim / 2 = 64 frequencies
        with torch.device("meta"):
            model = VLRewardModel(config)
            total = count_parameters(model)[1]
            vision = sum(p.numel() for p in model.model.visual.parameters())
            for rank in ranks:
                lora_model = apply_lora(VLRewardModel(config), LoraArguments(use_lora=True, lora_r=rank))
                trainable = count_parameters(lora_model)[0]
                rows.append(
                    {
                        "model": f"Qwen2.5-VL-{name}",
                        "parameters": total,
                        "vision_parameters": vision,
                        "lora_r": rank,
                        "trainable": trainable,
                        "full_ft_gb": total * TRAINED_BYTES / 1e9,
                        "lora_frozen_weights_gb": total * FROZEN_BYTES / 1e9,  # the whole base, its head too
                        "lora_trained_state_gb": trainable * TRAINED_BYTES / 1e9,
                    }
                )
        del model, lora_model
    return rows


def print_shapes(ranks: list[int]) -> None:
    rows = real_model_rows(ranks)
    header = (
        f"{'model':<18} {'parameters':>15} {'LoRA r':>6} {'trainable':>13} {'%':>6} {'full FT GB':>11} "
        f"{'LoRA: frozen bf16 GB':>21} {'LoRA: trained state GB':>23} {'LoRA GB / 8 GPUs':>17}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        lora_total = row["lora_frozen_weights_gb"] + row["lora_trained_state_gb"]
        print(
            f"{row['model']:<18} {row['parameters']:>15,} {row['lora_r']:>6} {row['trainable']:>13,} "
            f"{100 * row['trainable'] / row['parameters']:>6.2f} {row['full_ft_gb']:>11.1f} "
            f"{row['lora_frozen_weights_gb']:>21.1f} {row['lora_trained_state_gb']:>23.2f} {lora_total / 8:>17.1f}"
        )
    print(
        f"bytes per parameter: trained {TRAINED_BYTES} (bf16 weight + bf16 gradient + fp32 master + AdamW 2 x fp32), "
        f"frozen {FROZEN_BYTES}; activations not included; ZeRO-3 divides all of it over the GPUs"
    )
    print(json.dumps({"shapes": rows}))


# ----------------------------------------------------------------------------------------------------------------------
# Driver


def run_worker(argv: list[str], *worker: str) -> dict:
    return bench_packing.run_worker(argv, *worker, script=__file__)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        kind, modes = args.worker
        result = timing_worker(args, modes.split(",")) if kind == "time" else memory_worker(args, modes)
        print(json.dumps(result))
        return
    if args.shapes:
        print_shapes([int(rank) for rank in args.shape_ranks.split(",")])
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    modes = args.modes.split(",")
    timings = run_worker(argv, "time", args.modes)
    results = {mode: dict(timings[mode], **run_worker(argv, "memory", mode)) for mode in modes}

    header = (
        f"{'mode':<5} {'parameters':>12} {'trainable':>12} {'weights MiB':>12} {'grads MiB':>10} "
        f"{'optimizer MiB':>14} {'peak MiB':>9} {'step s':>7} {'best s':>7}"
    )
    print(header)
    print("-" * len(header))
    for mode, result in results.items():
        print(
            f"{mode:<5} {result['parameters']:>12,} {result['trainable']:>12,} {result['weights_mib']:>12.0f} "
            f"{result['gradients_mib']:>10.1f} {result['optimizer_state_mib']:>14.1f} {result['peak_mem_mib']:>9.0f} "
            f"{result['step_s_median']:>7.2f} {result['step_s_min']:>7.2f}"
        )
    summary = {"config": {key: value for key, value in vars(args).items() if key != "worker"}, "results": results}
    if "full" in results and "lora" in results:
        full, lora = results["full"], results["lora"]
        summary["lora_over_full"] = {
            "peak_mem": round(lora["peak_mem_mib"] / full["peak_mem_mib"], 3),
            "step_time": round(lora["step_s_median"] / full["step_s_median"], 3),
            "trainable": round(lora["trainable"] / full["trainable"], 5),
        }
        print(
            f"LoRA r={args.lora_r} / full fine-tuning: peak memory {summary['lora_over_full']['peak_mem']:.2f}x "
            f"({full['peak_mem_mib'] - lora['peak_mem_mib']:.0f} MiB less), step time "
            f"{summary['lora_over_full']['step_time']:.2f}x, trainable parameters "
            f"{lora['trainable'] / full['trainable']:.2%}"
        )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
