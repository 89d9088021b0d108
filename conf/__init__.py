"""Global settings, imported as ``from conf import settings`` (the classic CIFAR-100 repo
layout)."""
from conf import global_settings as settings

__all__ = ["settings"]
