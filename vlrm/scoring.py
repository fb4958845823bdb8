"""The import path of ``RewardScorer`` before vlrm's modules moved into wings, kept so that scripts written for it keep
running: ``from vlrm.scoring import RewardScorer`` gives the same class, with a ``DeprecationWarning`` naming the
path to use instead (``from vlrm import RewardScorer``, or ``vlrm.use.scoring``). Nothing in vlrm imports it.
"""

import warnings

from vlrm.use.scoring import DEFAULT_MAX_SEQ_LENGTH, PairScores, RewardScorer

__all__ = ["DEFAULT_MAX_SEQ_LENGTH", "PairScores", "RewardScorer"]

warnings.warn(
    "vlrm.scoring moved into vlrm.use.scoring: import RewardScorer from vlrm (from vlrm import RewardScorer)",
    DeprecationWarning,
    stacklevel=2,
)
