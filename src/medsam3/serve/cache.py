"""A bounded LRU cache of SAM3 vision features, so a new prompt on the same image skips the image encoder.

The :class:`~medsam3.predict.segmenter.Segmenter` computes image features with
:func:`medsam3.model.forward.encode_image`, which calls ``model.get_vision_features(pixel_values=...)``.
:func:`install_feature_cache` wraps that method **on one model instance**: the key is a digest of the
exact pixel tensor the encoder would see (its bytes, shape, dtype and device), so

* the same image with the same preprocessing hits the cache, whatever the prompt;
* a different CT window (chosen per concept), another slice of a volume or another image misses it:
  features are never reused for pixels they were not computed from.

Entries are evicted least-recently-used first when there are more than ``max_items`` or their tensors take
more than ``max_bytes`` (an entry larger than ``max_bytes`` is returned but not kept). The cache is
thread-safe; two workers encoding the same new image at once may both compute it (the second result is
kept). Cached outputs are shared between calls and must be treated as read-only, as
:mod:`medsam3.model.forward` does.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch


def tensor_bytes(value: Any) -> int:
    """Bytes held by the tensors in ``value`` (tensors, tuples / lists / dicts / model outputs of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def pixel_key(pixel_values: torch.Tensor) -> str:
    """Digest of a pixel tensor: its bytes, shape, dtype and device."""
    t = pixel_values.detach()
    head = f"{tuple(t.shape)}|{t.dtype}|{t.device}".encode()
    data = t.contiguous().cpu().view(torch.uint8).numpy() if t.numel() else b""
    h = hashlib.blake2b(head, digest_size=20)
    h.update(data.data if not isinstance(data, bytes) else data)
    return h.hexdigest()


@dataclass
class CacheStats:
    """Counters since start-up: ``encoder_calls`` is how often the wrapped encoder really ran."""

    hits: int = 0
    misses: int = 0
    encoder_calls: int = 0
    evictions: int = 0
    items: int = 0
    bytes: int = 0

    def to_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


class FeatureCache:
    """LRU of encoder outputs keyed by :func:`pixel_key`, bounded by count and bytes."""

    def __init__(self, max_items: int = 8, max_bytes: int = 2 * 1024**3):
        if max_items < 1 or max_bytes < 1:
            raise ValueError("the feature cache needs max_items >= 1 and max_bytes >= 1")
        self.max_items = int(max_items)
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Any | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return entry[0]

    def put(self, key: str, value: Any) -> None:
        size = tensor_bytes(value)
        with self._lock:
            if key in self._entries:
                self._bytes -= self._entries.pop(key)[1]
            if size > self.max_bytes:
                self._update_stats()
                return
            self._entries[key] = (value, size)
            self._bytes += size
            while len(self._entries) > self.max_items or self._bytes > self.max_bytes:
                _, (_, old) = self._entries.popitem(last=False)
                self._bytes -= old
                self.stats.evictions += 1
            self._update_stats()

    def count_encoder_call(self) -> None:
        with self._lock:
            self.stats.encoder_calls += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self._update_stats()

    def _update_stats(self) -> None:
        self.stats.items = len(self._entries)
        self.stats.bytes = self._bytes

    def snapshot(self) -> dict[str, int]:
        """Counters and size, for ``/api/info``."""
        with self._lock:
            return self.stats.to_dict() | {"max_items": self.max_items, "max_bytes": self.max_bytes}


def install_feature_cache(model: Any, cache: FeatureCache) -> None:
    """Route ``model.get_vision_features`` through ``cache`` (on this instance only; idempotent)."""
    if getattr(model, "_medsam3_feature_cache", None) is cache:
        return
    original = getattr(model, "_medsam3_uncached_vision", None) or model.get_vision_features

    def get_vision_features(pixel_values: torch.Tensor, **kwargs: Any):
        if kwargs:  # unusual options: compute directly, never mix them with cached results
            cache.count_encoder_call()
            return original(pixel_values=pixel_values, **kwargs)
        key = pixel_key(pixel_values)
        hit = cache.get(key)
        if hit is not None:
            return hit
        cache.count_encoder_call()
        out = original(pixel_values=pixel_values)
        cache.put(key, out)
        return out

    # nn.Module.__setattr__ stores plain callables in the instance dict, shadowing the class method.
    object.__setattr__(model, "_medsam3_uncached_vision", original)
    object.__setattr__(model, "_medsam3_feature_cache", cache)
    object.__setattr__(model, "get_vision_features", get_vision_features)
