"""The use wing: the reward in use, from Python, in TRL's GRPOTrainer, over HTTP and in inference engines.

``scoring.RewardScorer`` scores rows; ``rewards.VLRewardFunction`` is TRL's reward-function contract; ``server`` is the
HTTP app ``serve_rm.py`` runs; ``export`` writes checkpoints for vLLM's pooling runner and merges LoRA adapters.
"""

from vlrm.use.export import export_for_vllm, merge_adapter, reward_text
from vlrm.use.rewards import VLRewardFunction
from vlrm.use.scoring import DEFAULT_MAX_SEQ_LENGTH, PairScores, RewardScorer

__all__ = [
    "DEFAULT_MAX_SEQ_LENGTH", "PairScores", "RewardScorer", "VLRewardFunction", "export_for_vllm", "merge_adapter",
    "reward_text",
]  # fmt: skip
