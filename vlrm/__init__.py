"""vlrm: train, evaluate and use reward models for vision-language models.

The package the scripts (``train_rm.py``, ``eval_rm.py``) share and that users import, e.g.
``from vlrm.scoring import RewardScorer``. Submodules are imported on use, so ``import vlrm`` is cheap.
"""

__version__ = "0.1.0"
