"""Name -> function tables for advantage estimators and policy losses (verl-compatible API).

`algorithm.adv_estimator` and `actor.policy_loss.loss_mode` are looked up here by name, so a user
plugs in their own estimator or loss by decorating a function with `register_adv_est("mine")` /
`register_policy_loss("mine")` in a module that is imported before the config is validated.
Registration happens at import time; `async_pmd.algos` imports the built-in modules.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

F = TypeVar("F", bound=Callable)

_ADV_ESTIMATORS: dict[str, Callable] = {}
_POLICY_LOSSES: dict[str, Callable] = {}

# Read-only live views, for code that wants the tables themselves rather than the names.
ADV_ESTIMATORS: Mapping[str, Callable] = MappingProxyType(_ADV_ESTIMATORS)
POLICY_LOSSES: Mapping[str, Callable] = MappingProxyType(_POLICY_LOSSES)


def _same_definition(a: Callable, b: Callable) -> bool:
    # A module imported twice (importlib.reload, a Ray worker re-importing under another path
    # alias) re-creates its functions; that is the same registration, not a clash.
    return a is b or (
        getattr(a, "__module__", None) == getattr(b, "__module__", None)
        and getattr(a, "__qualname__", None) == getattr(b, "__qualname__", None)
    )


def _register(table: dict[str, Callable], kind: str, name: str) -> Callable[[F], F]:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty string, got {name!r}")

    def decorator(fn: F) -> F:
        existing = table.get(name)
        if existing is not None and not _same_definition(existing, fn):
            raise ValueError(
                f"{kind} {name!r} is already registered to "
                f"{existing.__module__}.{existing.__qualname__}; pick another name"
            )
        table[name] = fn
        return fn

    return decorator


def _lookup(table: Mapping[str, Callable], kind: str, name: str) -> Callable:
    # verl passes an `AdvantageEstimator` str-enum in places; accept its value.
    key = getattr(name, "value", name)
    try:
        return table[key]
    except KeyError:
        raise ValueError(f"unknown {kind} {key!r}; registered: {sorted(table)}") from None


def register_adv_est(name: str) -> Callable[[F], F]:
    """Decorator: register `fn(token_level_rewards, response_mask, index, config=None)` as `name`.

    Raises ValueError if `name` is already bound to a different function.
    """
    return _register(_ADV_ESTIMATORS, "advantage estimator", name)


def get_adv_estimator_fn(name: str) -> Callable:
    """The estimator registered as `name`; ValueError listing the known names otherwise."""
    return _lookup(_ADV_ESTIMATORS, "advantage estimator", name)


def register_policy_loss(name: str) -> Callable[[F], F]:
    """Decorator: register `fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode,
    config=None, partition_weights=None, rollout_is_weights=None, max_response_length=None)
    -> (loss, metrics)` as `name`.

    Raises ValueError if `name` is already bound to a different function.
    """
    return _register(_POLICY_LOSSES, "policy loss", name)


def get_policy_loss_fn(name: str) -> Callable:
    """The policy loss registered as `name`; ValueError listing the known names otherwise."""
    return _lookup(_POLICY_LOSSES, "policy loss", name)


def list_adv_estimators() -> list[str]:
    """Registered advantage-estimator names, sorted."""
    return sorted(_ADV_ESTIMATORS)


def list_policy_losses() -> list[str]:
    """Registered policy-loss names, sorted."""
    return sorted(_POLICY_LOSSES)
