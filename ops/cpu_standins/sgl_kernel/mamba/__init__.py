"""STAND-IN for `sgl_kernel.mamba` (see `sgl_kernel/__init__.py` here): every name raises
NotImplementedError; SGLang imports this module only for Mamba/linear-attention models."""

from sgl_kernel import __getattr__  # noqa: F401  (module-level __getattr__, PEP 562)
