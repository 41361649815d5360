"""Fixtures: a fake host, a node agent (PluginManager) on it, and the kubelet simulator."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from hostdev.deviceplugin.manager import PluginManager
from hostdev.deviceplugin.resources import ResourceConfig, parse_resources
from hostdev.host import Sysfs
from tests.fixtures.kubeletsim import KubeletSim

AgentFactory = Callable[..., AbstractAsyncContextManager[PluginManager]]


def resources(*entries: dict[str, Any]) -> tuple[ResourceConfig, ...]:
    return parse_resources(list(entries))


@pytest.fixture
def host_root(short_tmp: str) -> Path:
    return Path(short_tmp) / "host"


@pytest.fixture
def state_dir(short_tmp: str) -> str:
    return os.path.join(short_tmp, "state")


@pytest.fixture
def agent(host_root: Path, kubelet: KubeletSim, state_dir: str) -> AgentFactory:
    """``async with agent(resources) as manager``: a started node agent on the fake host, with
    uevents off (tests inject PCI events with ``manager.notify``) and the first scan done."""

    @asynccontextmanager
    async def run(
        res: Sequence[ResourceConfig], *, scan: bool = True, **kw: Any
    ) -> AsyncIterator[PluginManager]:
        kw.setdefault("uevents", False)
        mgr = PluginManager(Sysfs(str(host_root)), kubelet.plugin_dir, state_dir, **kw)
        await mgr.start()
        try:
            await mgr.apply(res)
            if scan:
                await mgr.rescan()
            yield mgr
        finally:
            await mgr.close()

    return run
