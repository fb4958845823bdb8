"""vlrm: train, evaluate and use reward models for vision-language models.

The public API, stable while the package's insides move:

    from vlrm import RewardScorer, VLRewardFunction, VLRewardModel, load_config, TrainConfig

    scorer = RewardScorer.from_pretrained("outputs/run/checkpoint-200")
    rewards = scorer.score([{"prompt": "What is in the image?", "images": ["cat.png"], "response": "A cat."}])

Each name is imported on first use (``import vlrm`` is cheap). Commands: ``python -m vlrm --help``.

The package has five wings along the data flow, each importing only its own and the wings below it:
``vlrm.data`` (files and layouts -> prepared canonical rows), ``vlrm.layout`` (rows -> padded or packed model
inputs), ``vlrm.model`` (families, the reward model, LoRA, checkpoints), ``vlrm.train`` (configs, trainer) and
``vlrm.use`` (scorer, GRPO reward function, HTTP server, export); beside them ``vlrm.errors`` (imported by all),
``vlrm.metrics`` and ``vlrm.tiny`` (offline tiny models).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlrm.lazy import public_names

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    # errors
    "BadSampleError": "vlrm.errors",
    "CheckpointError": "vlrm.errors",
    "ConfigError": "vlrm.errors",
    # data
    "DataSettings": "vlrm.data.prepare",
    "load_preference_dataset": "vlrm.data.prepare",
    "prepare_mixture": "vlrm.data.prepare",
    "REFERENCE_RESULTS": "vlrm.data.benchmarks",
    "make_synthetic_dataset": "vlrm.data.synthetic",
    "make_ranking_dataset": "vlrm.data.synthetic",
    "make_video_dataset": "vlrm.data.synthetic_video",
    "make_steps_dataset": "vlrm.data.synthetic_steps",
    "VideoSettings": "vlrm.data.videos",
    "sample_video": "vlrm.data.videos",
    # layout
    "PreferenceEncoder": "vlrm.layout.encoder",
    "make_collator": "vlrm.layout.packed",
    "enable_packed_attention": "vlrm.layout.attention",
    "StepCollator": "vlrm.layout.steps",
    "ProcessArguments": "vlrm.layout.steps",
    "JointCollator": "vlrm.layout.joint",
    "JointArguments": "vlrm.layout.joint",
    # model
    "VLRewardModel": "vlrm.model.reward_model",
    "load_checkpoint": "vlrm.model.loading",
    "find_checkpoints": "vlrm.model.checkpoints",
    "family_of": "vlrm.model.families",
    "HeadArguments": "vlrm.model.heads",
    # train
    "TrainConfig": "vlrm.train.config",
    "EvalConfig": "vlrm.train.config",
    "load_config": "vlrm.train.config_files",
    "VLRewardTrainer": "vlrm.train.trainer",
    "ObjectiveArguments": "vlrm.train.objectives",
    "Objective": "vlrm.train.objectives",
    # use
    "RewardScorer": "vlrm.use.scoring",
    "PairScores": "vlrm.use.scoring",
    "StepScores": "vlrm.use.process",
    "VLRewardFunction": "vlrm.use.rewards",
    "export_for_vllm": "vlrm.use.export",
    "reward_text": "vlrm.use.export",
    "ServerSettings": "vlrm.use.server.settings",
    "create_app": "vlrm.use.server.app",
    # beside the wings
    "evaluate_pairs": "vlrm.metrics",
    "ranking_metrics": "vlrm.metrics",
    "step_metrics": "vlrm.metrics",
    "best_of_n": "vlrm.metrics",
}

__all__ = [
    "BadSampleError",
    "CheckpointError",
    "ConfigError",
    "DataSettings",
    "EvalConfig",
    "HeadArguments",
    "JointArguments",
    "JointCollator",
    "Objective",
    "ObjectiveArguments",
    "PairScores",
    "PreferenceEncoder",
    "ProcessArguments",
    "REFERENCE_RESULTS",
    "RewardScorer",
    "ServerSettings",
    "StepCollator",
    "StepScores",
    "TrainConfig",
    "VLRewardFunction",
    "VLRewardModel",
    "VLRewardTrainer",
    "VideoSettings",
    "best_of_n",
    "create_app",
    "enable_packed_attention",
    "evaluate_pairs",
    "export_for_vllm",
    "family_of",
    "find_checkpoints",
    "load_checkpoint",
    "load_config",
    "load_preference_dataset",
    "make_collator",
    "make_ranking_dataset",
    "make_steps_dataset",
    "make_synthetic_dataset",
    "make_video_dataset",
    "prepare_mixture",
    "ranking_metrics",
    "reward_text",
    "sample_video",
    "step_metrics",
]


__getattr__, _public_dir = public_names(__name__, _PUBLIC)


def __dir__() -> list[str]:
    return [*_public_dir(), "__version__"]


if TYPE_CHECKING:  # what editors and type checkers see; at run time each name loads on first use
    from vlrm.data.benchmarks import REFERENCE_RESULTS
    from vlrm.data.prepare import DataSettings, load_preference_dataset, prepare_mixture
    from vlrm.data.synthetic import make_ranking_dataset, make_synthetic_dataset
    from vlrm.data.synthetic_steps import make_steps_dataset
    from vlrm.data.synthetic_video import make_video_dataset
    from vlrm.data.videos import VideoSettings, sample_video
    from vlrm.errors import BadSampleError, CheckpointError, ConfigError
    from vlrm.layout.attention import enable_packed_attention
    from vlrm.layout.encoder import PreferenceEncoder
    from vlrm.layout.joint import JointArguments, JointCollator
    from vlrm.layout.packed import make_collator
    from vlrm.layout.steps import ProcessArguments, StepCollator
    from vlrm.metrics import best_of_n, evaluate_pairs, ranking_metrics, step_metrics
    from vlrm.model.checkpoints import find_checkpoints
    from vlrm.model.families import family_of
    from vlrm.model.heads import HeadArguments
    from vlrm.model.loading import load_checkpoint
    from vlrm.model.reward_model import VLRewardModel
    from vlrm.train.config import EvalConfig, TrainConfig
    from vlrm.train.config_files import load_config
    from vlrm.train.objectives import Objective, ObjectiveArguments
    from vlrm.train.trainer import VLRewardTrainer
    from vlrm.use.export import export_for_vllm, reward_text
    from vlrm.use.process import StepScores
    from vlrm.use.rewards import VLRewardFunction
    from vlrm.use.scoring import PairScores, RewardScorer
    from vlrm.use.server.app import create_app
    from vlrm.use.server.settings import ServerSettings
