"""The CD-MoE search's saved progress, so an interrupted search resumes where it stopped.

The state is a small JSON file holding every finished greedy step (each layer's expert order
and divergences, the layer order so far). It is keyed by the model's weights fingerprint, the
calibration batches' fingerprint and every search setting: a state made for anything else is
refused, never silently reused. Each write goes to a temporary file renamed into place, so a
kill mid-write leaves the previous state intact.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoECompressError
from ..walk.cache import default_cache_dir

STATE_VERSION = 1


def state_key(model_fingerprint: str, data_fingerprint: str, settings: dict) -> dict:
    return {"version": STATE_VERSION, "model": model_fingerprint, "data": data_fingerprint, "settings": settings}


def default_state_path(key: dict, cache_dir: str | Path | None) -> Path:
    """<cache>/condense/<hash of the key>.json (the statistics cache's parent by default)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    root = Path(cache_dir) if cache_dir else default_cache_dir().parent
    return root / "condense" / f"{digest}.json"


@dataclass
class SearchState:
    """Finished work: per layer the greedy expert order and each prefix's divergence; the layer order."""

    key: dict
    path: Path | None = None
    expert_orders: dict[int, list[int]] = field(default_factory=dict)
    expert_divergences: dict[int, list[float]] = field(default_factory=dict)
    finished_layers: list[int] = field(default_factory=list)
    layer_order: list[int] = field(default_factory=list)
    layer_divergences: list[float] = field(default_factory=list)
    resumed: bool = False

    @classmethod
    def open(cls, key: dict, path: Path | None) -> SearchState:
        """The saved state at `path` if it exists and matches `key`, else a fresh one."""
        if path is None or not path.is_file():
            return cls(key, path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise MoECompressError(f"search state {path} is unreadable ({exc}); delete it to start the search again.") from None
        if data.get("key") != key:
            raise MoECompressError(
                f"search state {path} belongs to another model, calibration set or search settings; "
                "delete it or choose another state file."
            )
        return cls(
            key, path,
            expert_orders={int(k): v for k, v in data["expert_orders"].items()},
            expert_divergences={int(k): v for k, v in data["expert_divergences"].items()},
            finished_layers=data["finished_layers"],
            layer_order=data["layer_order"],
            layer_divergences=data["layer_divergences"],
            resumed=True,
        )

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {
            "key": self.key,
            "expert_orders": {str(k): v for k, v in self.expert_orders.items()},
            "expert_divergences": {str(k): v for k, v in self.expert_divergences.items()},
            "finished_layers": self.finished_layers,
            "layer_order": self.layer_order,
            "layer_divergences": self.layer_divergences,
        }
        partial = self.path.with_suffix(f".partial-{os.getpid()}")
        partial.write_text(json.dumps(body, indent=1) + "\n")
        partial.replace(self.path)
