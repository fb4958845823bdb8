"""The HTTP reward server (``serve_rm.py``): ``create_app(scorer, ServerSettings(...), checkpoint_dir)``."""

from vlrm.use.server.app import create_app
from vlrm.use.server.batcher import BatchStats, MicroBatcher
from vlrm.use.server.media import ImageDecoder
from vlrm.use.server.requests import RequestParser, chat_text_to_messages, split_query
from vlrm.use.server.settings import RequestError, ServerSettings, require_reward_stats

__all__ = [
    "BatchStats", "ImageDecoder", "MicroBatcher", "RequestError", "RequestParser", "ServerSettings",
    "chat_text_to_messages", "create_app", "require_reward_stats", "split_query",
]  # fmt: skip
