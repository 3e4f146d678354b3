"""Where bitq-tvm keeps what it fetches once and reuses (the aarch64 rootfs, the model corpus)."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """``$BITQ_TVM_CACHE_DIR``, else ``$XDG_CACHE_HOME/bitq-tvm``, else ``~/.cache/bitq-tvm``."""
    if os.environ.get("BITQ_TVM_CACHE_DIR"):
        return Path(os.environ["BITQ_TVM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "bitq-tvm"
