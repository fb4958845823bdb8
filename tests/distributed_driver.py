"""train_rm.py with a reward probe, for tests/test_distributed.py. Launched by run_distributed.sh (TRAIN_SCRIPT):

    TRAIN_SCRIPT=tests/distributed_driver.py ./run_distributed.sh --gpus 2 --config CONFIG -- --deepspeed zero3.json

It runs train_rm.py unchanged, adding one callback: right after each checkpoint is written, every rank scores the
eval set with the model as it is in training (under ZeRO-3 each rank's forward gathers the partitioned weights) and
writes the rewards, with how the run was distributed, to ``checkpoint-N/probe_rank{R}.json``. The test reloads the
checkpoint in one process and must get the same rewards.

DeepSpeed on CPU: transformers sets DeepSpeed up only on an accelerator. With ``use_cpu`` (or ACCELERATE_USE_CPU)
the Trainer silently falls back to DDP, and without it accelerate finds no backend and every process trains alone.
So, given --deepspeed on a machine without CUDA, this driver starts accelerate's state itself the way it does on
GPUs (DeepSpeed's comm layer, over gloo) and has TrainingArguments adopt it
(``accelerator_config.use_configured_state``).
"""

import json
import os
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import vlrm.train.trainer  # noqa: E402
from vlrm.layout.labels import LABEL_FIELDS  # noqa: E402


def start_deepspeed_on_cpu() -> list[str]:
    """Start accelerate's DeepSpeed state over gloo; returns the overrides that make TrainingArguments use it."""
    import deepspeed.ops
    from accelerate import PartialState

    # DeepSpeed's CPU comm layer would first compile its shared-memory all-reduce, a C++ op for CPU inference that
    # training over gloo never calls: ~2 minutes on 2 cores, longer than all the test runs together.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.pop("ACCELERATE_USE_CPU", None)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    del os.environ["ACCELERATE_USE_DEEPSPEED"]  # as transformers does after its own set-up
    return ["--use_cpu", "false", "--accelerator_config", json.dumps({"use_configured_state": True})]


class RewardProbe(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_save(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.model  # the module itself (DeepSpeed's engine and DDP wrap it; its hooks stay on it)
        # Between steps a ZeRO-3 rank's large weights are empty placeholders (its slices live in DeepSpeed).
        local_numel = sum(p.numel() for p in model.parameters())
        batch = trainer._prepare_inputs(trainer.data_collator(list(trainer.eval_dataset)))
        for key in LABEL_FIELDS:  # pairs' fields, a ranking's or a process reward's labels: not model inputs
            batch.pop(key, None)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            rewards = model(**batch).rewards
        model.train(was_training)
        engine = trainer.model_wrapped
        probe = {
            "step": state.global_step,
            "rewards": rewards.tolist(),
            "world_size": torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1,
            "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
            "zero_stage": engine.zero_optimization_stage() if trainer.is_deepspeed_enabled else None,
            "local_numel": local_numel,
            "full_numel": sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters()),
        }
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / f"probe_rank{args.process_index}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(probe))


class ProbedTrainer(vlrm.train.trainer.VLRewardTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_callback(RewardProbe(self))


overrides = sys.argv[2:]
if any(arg.split("=")[0] == "--deepspeed" for arg in overrides) and not torch.cuda.is_available():
    overrides += start_deepspeed_on_cpu()
vlrm.train.trainer.VLRewardTrainer = ProbedTrainer  # train_rm.py imports it from the module when it runs
sys.argv = [str(REPO / "train_rm.py"), sys.argv[1], *overrides]
runpy.run_path(str(REPO / "train_rm.py"), run_name="__main__")
