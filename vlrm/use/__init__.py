"""The use wing: the reward in use, from Python, in TRL's GRPOTrainer, over HTTP and in inference engines.

``scoring.RewardScorer`` scores rows; ``rewards.VLRewardFunction`` is TRL's reward-function contract; ``server`` is the
HTTP app ``serve_rm.py`` runs; ``export`` writes checkpoints for vLLM's pooling runner and merges LoRA adapters.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlrm.lazy import public_names

# public name -> the module that defines it; each loads on first use (vlrm.lazy)
_PUBLIC = {
    "export_for_vllm": "vlrm.use.export",
    "merge_adapter": "vlrm.use.export",
    "reward_text": "vlrm.use.export",
    "VLRewardFunction": "vlrm.use.rewards",
    "DEFAULT_MAX_SEQ_LENGTH": "vlrm.use.scoring",
    "PairScores": "vlrm.use.scoring",
    "RewardScorer": "vlrm.use.scoring",
}

__all__ = [
    "DEFAULT_MAX_SEQ_LENGTH", "PairScores", "RewardScorer", "VLRewardFunction", "export_for_vllm", "merge_adapter",
    "reward_text",
]  # fmt: skip
__getattr__, __dir__ = public_names(__name__, _PUBLIC)

if TYPE_CHECKING:  # what editors and type checkers see
    from vlrm.use.export import export_for_vllm, merge_adapter, reward_text
    from vlrm.use.rewards import VLRewardFunction
    from vlrm.use.scoring import DEFAULT_MAX_SEQ_LENGTH, PairScores, RewardScorer
