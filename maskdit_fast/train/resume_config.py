"""Which config changes a resumed run accepts: a run continues only with the config it was saved
with, apart from :data:`RESUMABLE_CHANGES`: how long to train, how often to log and save, how the
work is split over processes, devices and loader workers, speed-only settings (none changes what
the run has computed so far), what to do about a non-finite or spiking loss (the advice of
those errors is to change them), and how the run reacts to a stop signal or a stalled rank."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UserError

RESUMABLE_CHANGES = frozenset({
    "train.max_steps", "train.log_every", "train.sample_every", "train.ckpt_every", "train.keep_last",
    "train.parallel", "train.micro_batch", "train.device", "train.activation_checkpointing", "train.compile",
    "train.ddp_bucket_mb", "train.fsdp_cpu_offload", "data.num_workers", "data.verify", "data.dali_threads",
    "train.nonfinite", "train.spike_zscore", "train.spike_min_ratio", "train.spike_warmup", "train.spike_decay",
    "train.spike_action", "train.loggers",
    "train.spike_action", "train.preempt_signals", "train.collective_timeout_s",
})

# Keys added by a later version whose value matters to a resume: the value a saved config without them ran with.
ADDED_KEYS = {"train.optimizer": "adamw"}


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}"""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _flat_configs(saved: dict[str, Any], now: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(saved, now) flattened; the saved one with the values of :data:`ADDED_KEYS` it lacks (and ``now`` has)."""
    current = flatten(json.loads(json.dumps(now)))  # tuples compare as the saved lists
    return {**{k: v for k, v in ADDED_KEYS.items() if k in current}, **flatten(saved)}, current


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between the saved config and the current one (nested dicts),
    except :data:`RESUMABLE_CHANGES` and keys the saved config lacks (added by a later version; those of
    :data:`ADDED_KEYS` compare with the value they had)."""
    then, current = _flat_configs(saved, now)
    return sorted(key for key in then.keys() | current.keys()
                  if key not in RESUMABLE_CHANGES and key in then and then[key] != current.get(key))


def check_resumable(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Raise a UserError naming every changed key (then/now) unless ``now`` may resume ``saved``."""
    changed = changed_keys(saved, now)
    if not changed:
        return
    then, current = _flat_configs(saved, now)
    listed = ", ".join(f"{key} ({then[key]!r} then, {current.get(key)!r} now)" for key in changed)
    raise UserError(f"cannot resume {path}: the config differs in {listed}; resume with the same --config and "
                    "overrides, or start a new run in another --out (only "
                    f"{', '.join(sorted(RESUMABLE_CHANGES))} may change)")
