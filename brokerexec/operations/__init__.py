"""Operations: one service over many requests, tracked as a whole (issue 22).

``requests.py`` names an operation's items (a grid of requests, each request's key);
``registry.py`` holds their states (sans-I/O, thread-safe, saved as JSON).
"""

from .registry import Item, ItemState, OperationStatus, Plan, Registry
from .requests import Grid, grid, item_key

__all__ = ["Grid", "Item", "ItemState", "OperationStatus", "Plan", "Registry", "grid", "item_key"]
