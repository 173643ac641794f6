"""RecentlyUsed: values kept for the most recently used keys, the one eviction rule of the engine's caches
(encoded prompts in text.PromptCache, history-frame latents in context.ContextLatentCache)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Sequence


class RecentlyUsed:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self._values: OrderedDict[Hashable, object] = OrderedDict()

    def _take(self, keys: Sequence[Hashable]) -> list:
        """The values of `keys` (all present), which become the most recent; then the oldest beyond the
        capacity go. A call asking for more than the capacity still gets them all."""
        found = [self._values[k] for k in keys]
        for k in keys:
            self._values.move_to_end(k)
        while len(self._values) > self.capacity:
            self._values.popitem(last=False)
        return found

    def __contains__(self, key: Hashable) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        self._values.clear()
