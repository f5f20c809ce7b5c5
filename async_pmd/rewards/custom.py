"""Resolve a reward spec string to a function: a built-in name, `package.module:function`, or
`path/to/file.py:function`.

Specs are resolved by import only; no string is ever eval'd. A file spec executes that file as a
module, as importing a package would, so it must be trusted code like any other reward.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from types import ModuleType

from async_pmd.rewards.builtin import BUILTIN_REWARDS, RewardFn


def load_reward_fn(spec: str) -> RewardFn:
    """The reward function named by `spec`.

    Raises ValueError for an unknown built-in name or a malformed spec, FileNotFoundError for a
    missing file, ImportError for a module that does not import, AttributeError for a missing
    function, and TypeError for an attribute that is not callable with the four reward arguments.
    """
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"reward {spec!r} is not a built-in ({sorted(BUILTIN_REWARDS)}) nor of the form "
            "'package.module:function' or 'path/to/file.py:function'"
        )
    target, name = spec.rsplit(":", 1)
    if not target or not name.isidentifier():
        raise ValueError(f"reward spec {spec!r}: expected '<module or file.py>:<function name>'")
    module = _load_file(target) if _is_path(target) else _import_module(target, spec)
    fn = getattr(module, name, None)
    if fn is None:
        raise AttributeError(f"reward spec {spec!r}: {target!r} has no attribute {name!r}")
    _check_signature(fn, spec)
    return fn


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _import_module(target: str, spec: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ImportError(f"reward spec {spec!r}: cannot import module {target!r}: {e}") from e


def _load_file(target: str) -> ModuleType:
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward file {target!r} does not exist (resolved to {path})")
    # A name unique per path, so two reward files both called reward.py do not collide; it is
    # registered in sys.modules so that pickling and dataclasses inside the file work.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"async_pmd_reward_{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"reward file {str(path)!r} cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def _check_signature(fn: object, spec: str) -> None:
    if not callable(fn):
        raise TypeError(f"reward spec {spec!r} names a {type(fn).__name__}, not a function")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C functions have no signature
        return
    try:
        signature.bind("prompt", "response", "ground_truth", {})
    except TypeError as e:
        raise TypeError(
            f"reward spec {spec!r}: the function must accept (prompt, response, ground_truth, "
            f"extra); its signature is {signature}: {e}"
        ) from None
