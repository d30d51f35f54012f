"""Routers, one file each (base.py has the interface); `build_router` picks one by `moe.router` through the
registry in lightning_moe/config/registry.py."""

from __future__ import annotations

from lightning_moe.config.registry import ROUTERS, resolve
from lightning_moe.moe.routers.base import Router, RouterOutput


def router_class(name: str) -> type[Router]:
    return resolve(ROUTERS[name])


def build_router(hidden_size: int, moe) -> Router:
    """The router named by moe.router, configured from the moe config section."""
    return router_class(moe.router).from_config(hidden_size, moe)


__all__ = ["Router", "RouterOutput", "build_router", "router_class"]
