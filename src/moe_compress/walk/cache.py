"""Disk cache of observed statistics, keyed by (weights, config, calibration data, statistic set).

Calibration is the expensive step; a second method or ratio on the same model and data must
not pay for it again. A cache must never answer for another model, so the key holds:
  * a fingerprint of every weight: `content_fingerprint` hashes every byte of every parameter
    and buffer of an in-memory model (the in-memory path holds only models that fit in RAM);
    `checkpoint_fingerprint` hashes each safetensors shard's tensor headers (names, dtypes,
    shapes), size and mtime, which is cheap for a checkpoint far larger than RAM that is read
    lazily -- a changed tensor rewrites its shard, and with it the shard's mtime;
  * the model config as canonical JSON (routing settings such as top-k change statistics
    without touching a weight);
  * the calibration tokens.
Under that key live one or more entries, each holding a set of statistics (its file name adds a
hash of the set). A request is answered by any entry whose set contains every statistic asked
for, reading only those: one calibration pass that collected a superset (`engine.statistics.collect_statistics`
collects what every registered pruning method needs) serves every method after it. A new entry
replaces the entries its set contains.
An entry is also checked against the model's MoE layers and expert counts before it is used
(one missing a layer or a statistic is recomputed, never half-used), and every tensor it gives
against the sha256 the entry records for it: an entry whose data was altered or damaged behind
intact metadata is recomputed with a warning, never trusted. Writers use unique
temporary names and publish by rename. A cache directory that cannot be used (a file,
read-only, full) costs a warning, never the run.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import MoECompressError, warn
from ..paths import cache_root

CACHE_VERSION = "5"  # 3: entries keyed without the statistic names, found by what they hold; 4: with payload digests; 5: float64 norms, probabilities and moments
_CHUNK = 1 << 24  # bytes hashed per step, so a large tensor is never copied whole


def default_cache_dir() -> Path:
    return cache_root() / "stats"


@torch.no_grad()
def content_fingerprint(model: nn.Module) -> str:
    """Hash of every byte of every parameter and buffer (with names, shapes and dtypes)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise MoECompressError(
                f"{name} has no values (meta device); fingerprint a lazily read checkpoint with checkpoint_fingerprint."
            )
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        flat = tensor.detach().reshape(-1)
        if not flat.is_contiguous():
            flat = flat.contiguous()
        step = max(1, _CHUNK // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):
            digest.update(flat[start : start + step].cpu().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def checkpoint_fingerprint(directory: str | Path) -> str:
    """Identifies a checkpoint's weights from its safetensors headers, sizes and mtimes (see `Checkpoint.fingerprint`)."""
    from ..source.checkpoint import Checkpoint

    return Checkpoint(directory).fingerprint()


def config_fingerprint(config: object) -> str:
    """Hash of the model config as canonical JSON (private `_...` keys and the writer's version left out)."""
    data = config.to_dict() if hasattr(config, "to_dict") else dict(config)  # type: ignore[call-overload]
    data = {k: v for k, v in data.items() if not k.startswith("_") and k != "transformers_version"}
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def cache_key(model_fp: str, data_fp: str, config_fp: str = "") -> str:
    """The key of (weights, config, calibration data); entries under it differ by the statistics they hold."""
    text = json.dumps([CACHE_VERSION, model_fp, config_fp, data_fp])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _names_hash(names: Iterable[str]) -> str:
    return hashlib.sha256(json.dumps(sorted(set(names))).encode()).hexdigest()[:12]


Stats = dict[int, dict[str, torch.Tensor]]


def tensor_digest(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (hashed in place, no copy of a contiguous tensor)."""
    digest = hashlib.sha256(f"{tensor.dtype}:{tuple(tensor.shape)}\n".encode())
    digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _whole_layer(name: str) -> bool:
    """Whether statistic `name` holds one value for its decoder layer (`Statistic.sees_block`), not one per expert."""
    from .statistics import get_statistic

    try:
        return get_statistic(name).sees_block
    except KeyError:
        return False


def _layout(stats: Stats) -> dict[str, list]:
    """Per layer, the sorted statistic names (what an entry must hold)."""
    return {str(layer): sorted(named) for layer, named in sorted(stats.items())}


class StatsCache:
    """Statistics per MoE layer stored as safetensors files, `<key>.<hash of the statistic set>.safetensors`.

    `experts` (MoE layer -> router rows) describes the model the statistics are for; an entry
    whose layers or expert dimensions differ, or that lacks a statistic asked for, is a miss.
    """

    def __init__(self, directory: str | Path | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def _path(self, key: str, names: Iterable[str]) -> Path:
        return self.directory / f"{key}.{_names_hash(names)}.safetensors"

    def entries(self, key: str) -> list[Path]:
        """The entry files under `key`, smallest first (the cheapest to read that may answer)."""
        try:
            found = [p for p in self.directory.glob(f"{key}.*.safetensors") if p.is_file()]
        except OSError:
            return []
        return sorted(found, key=lambda p: (p.stat().st_size, p.name))

    def load(self, key: str, experts: dict[int, int] | None = None, names: tuple[str, ...] | None = None) -> Stats | None:
        """The statistics `names` (all of an entry's when None) from the first entry under `key` that holds them."""
        for path in self.entries(key):
            stats = self._read(path, key, experts, names)
            if stats is not None:
                return stats
        return None

    def _read(self, path: Path, key: str, experts: dict[int, int] | None, names: tuple[str, ...] | None) -> Stats | None:
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                layout = json.loads(metadata.get("layout", "null"))
                if metadata.get("key") != key or not self._covers(layout, experts, names):
                    return None
                digests = json.loads(metadata.get("digests", "{}"))
                stats: Stats = {
                    int(layer): {name: handle.get_tensor(f"{layer}/{name}") for name in (names or held)} for layer, held in layout.items()
                }
        except Exception as exc:  # a damaged or unreadable entry is recomputed, never fatal
            warn(f"statistics cache entry {path} is unreadable ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); recomputing.")
            return None
        altered = next((f"{layer}/{name}" for layer, named in stats.items() for name, value in named.items()
                        if digests.get(f"{layer}/{name}") != tensor_digest(value)), None)
        if altered is not None:
            warn(f"statistics cache entry {path} holds data ({altered}) that does not match the digest it records: it was altered or damaged; recomputing.")
            return None
        return stats if self._usable(stats, experts) else None

    @staticmethod
    def _covers(layout: object, experts: dict[int, int] | None, names: tuple[str, ...] | None) -> bool:
        """Whether an entry's layout (layer -> statistic names) has these layers and every statistic asked for."""
        if not isinstance(layout, dict) or not all(str(layer).isdigit() and isinstance(held, list) for layer, held in layout.items()):
            return False
        if experts is not None and {int(layer) for layer in layout} != set(experts):
            return False
        return names is None or all(set(names) <= set(held) for held in layout.values())

    @staticmethod
    def _usable(stats: Stats, experts: dict[int, int] | None) -> bool:
        if experts is not None:
            for layer, named in stats.items():
                # every statistic has the expert dimension first, or [batch, E, E] when stacked per batch; a whole layer's is one value
                if any(experts[layer] not in tuple(value.shape[:2]) for name, value in named.items() if not _whole_layer(name)):
                    return False
        return all(torch.isfinite(v).all() for named in stats.values() for v in named.values() if v.is_floating_point())

    def save(self, key: str, stats: Stats) -> bool:
        """Store an entry, replacing the entries under `key` whose statistics it holds too; False
        (with a warning) when the cache directory cannot be written."""
        names = {name for named in stats.values() for name in named}
        flat = {f"{layer}/{name}": value.contiguous() for layer, named in stats.items() for name, value in named.items()}
        target = self._path(key, names)
        partial = self.directory / f".{target.name}.{os.getpid()}@{socket.gethostname()}-{secrets.token_hex(4)}.partial"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            digests = json.dumps({name: tensor_digest(value) for name, value in flat.items()})
            save_file(flat, str(partial), metadata={"key": key, "layout": json.dumps(_layout(stats)), "digests": digests})
            partial.replace(target)
        except Exception as exc:  # OSError, or safetensors' wrapper of one (disk full)
            try:
                partial.unlink(missing_ok=True)
            except OSError:
                pass
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warn(f"statistics cache {self.directory} is unusable ({reason}); continuing without caching.")
            return False
        for older in self.entries(key):
            if older != target and self._held(older) <= names:
                older.unlink(missing_ok=True)
        return True

    @staticmethod
    def _held(path: Path) -> set[str]:
        """The statistic names an entry holds (empty when it cannot be read: then it is replaced too)."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                layout = json.loads((handle.metadata() or {}).get("layout", "{}"))
            return {name for held in layout.values() for name in held}
        except Exception:
            return set()
