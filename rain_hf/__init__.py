"""RAIN-Merging for Hugging Face models: add an instruct model's task vector to a reasoning model without
losing its ``<think> … </think>`` format (Huang et al., ICLR 2026, arXiv 2602.22538).

Example:
    >>> from rain_hf import RainMerger, RainMergingConfig
    >>> cfg = RainMergingConfig()
    >>> cfg.method, cfg.lam
    ('rain', 'auto')
"""

__version__ = "0.1.0"

from .config import ConfigError, RainMergingConfig  # noqa: E402

__all__ = ["RainMerger", "RainMergingConfig", "ConfigError", "ThinkFeatures", "MergeReport", "MergePlan",
           "__version__"]


def __getattr__(name: str):
    # torch/transformers are imported only when the merger is used, so `import rain_hf` stays light
    if name in ("RainMerger", "MergeReport", "MergePlan"):
        from . import merger

        return getattr(merger, name)
    if name == "ThinkFeatures":
        from .features import ThinkFeatures

        return ThinkFeatures
    raise AttributeError(f"module 'rain_hf' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))  # the names served lazily by __getattr__ too
