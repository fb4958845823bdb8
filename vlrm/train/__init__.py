"""The train wing: the configs of both scripts, the trainer, and the irrelevant-query augmentation.

``config`` holds ``TrainConfig`` and ``EvalConfig`` (every field with its help), ``config_files.load_config`` reads
them from YAML and the command line; ``trainer`` is TRL's RewardTrainer for vision-language rows
(``VLRewardTrainer``); ``irrelevant`` draws the irrelevant-query partners; ``process_group`` frees torch.distributed's
group before exit.
"""

from vlrm.train.config import EvalConfig, ModelDataArguments, TrainConfig
from vlrm.train.config_files import config_to_dict, load_config
from vlrm.train.irrelevant import IrrelevantPairSampler, IrrelevantQueryCollator, RowsWithIrrelevantPrompts
from vlrm.train.process_group import finish_process_group, import_deepspeed_before_the_process_group
from vlrm.train.trainer import LogFileCallback, VLRewardTrainer, reward_losses

__all__ = [
    "EvalConfig", "IrrelevantPairSampler", "IrrelevantQueryCollator", "LogFileCallback", "ModelDataArguments",
    "RowsWithIrrelevantPrompts", "TrainConfig", "VLRewardTrainer", "config_to_dict", "finish_process_group",
    "import_deepspeed_before_the_process_group", "load_config", "reward_losses",
]  # fmt: skip
