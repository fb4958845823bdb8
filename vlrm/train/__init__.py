"""The train wing: the configs of both scripts, the trainer, and the irrelevant-query augmentation.

``config`` holds ``TrainConfig`` and ``EvalConfig`` (every field with its help), ``config_files.load_config`` reads
them from YAML and the command line; ``trainer`` is TRL's RewardTrainer for vision-language rows
(``VLRewardTrainer``); ``irrelevant`` draws the irrelevant-query partners; ``process_group`` frees torch.distributed's
group before exit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlrm.lazy import public_names

# public name -> the module that defines it; each loads on first use (vlrm.lazy)
_PUBLIC = {
    "EvalConfig": "vlrm.train.config",
    "ModelDataArguments": "vlrm.train.config",
    "TrainConfig": "vlrm.train.config",
    "config_to_dict": "vlrm.train.config_files",
    "load_config": "vlrm.train.config_files",
    "IrrelevantPairSampler": "vlrm.train.irrelevant",
    "IrrelevantQueryCollator": "vlrm.train.irrelevant",
    "RowsWithIrrelevantPrompts": "vlrm.train.irrelevant",
    "finish_process_group": "vlrm.train.process_group",
    "import_deepspeed_before_the_process_group": "vlrm.train.process_group",
    "LogFileCallback": "vlrm.train.trainer",
    "VLRewardTrainer": "vlrm.train.trainer",
    "reward_losses": "vlrm.train.trainer",
}

__all__ = [
    "EvalConfig", "IrrelevantPairSampler", "IrrelevantQueryCollator", "LogFileCallback", "ModelDataArguments",
    "RowsWithIrrelevantPrompts", "TrainConfig", "VLRewardTrainer", "config_to_dict", "finish_process_group",
    "import_deepspeed_before_the_process_group", "load_config", "reward_losses",
]  # fmt: skip
__getattr__, __dir__ = public_names(__name__, _PUBLIC)

if TYPE_CHECKING:  # what editors and type checkers see
    from vlrm.train.config import EvalConfig, ModelDataArguments, TrainConfig
    from vlrm.train.config_files import config_to_dict, load_config
    from vlrm.train.irrelevant import IrrelevantPairSampler, IrrelevantQueryCollator, RowsWithIrrelevantPrompts
    from vlrm.train.process_group import finish_process_group, import_deepspeed_before_the_process_group
    from vlrm.train.trainer import LogFileCallback, VLRewardTrainer, reward_losses
