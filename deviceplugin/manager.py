"""Runs the node agent's pipeline: host view -> each resource's units -> kubelet front ends.

- :meth:`PluginManager.apply` sets the resource list (config file, or the NodeState spec):
  every resource gets a :class:`ResourceUnits`; a device-plugin resource's units are a
  :class:`ResourcePlugin` server, a DRA resource's units are read by the DRA front end
  (:mod:`hostdev.deviceplugin.dra`, attached in cluster mode). Servers start and stop only for
  resources that appear or disappear; a changed selector or strategy is applied in place; a
  resource that changes front end keeps its units and in-use set.
- Rescans are event driven: kernel PCI uevents name the function to re-read, inotify on
  ``/dev/vfio`` names the IOMMU group; both are debounced a few milliseconds and re-read only
  what they name. A slow periodic full resync is the safety net.
- Restarts: a re-created ``kubelet.sock`` (kubelet restart) makes every server register again;
  a deleted plugin socket makes that server serve again; a socket path the kubelet refuses as
  "already connected" (a stale endpoint it keeps) is given up for a fresh one; the last
  advertised lists are persisted and re-advertised first after an agent restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from hostdev.deviceplugin import persist
from hostdev.deviceplugin.flags import DEFAULT_PLUGIN_DIR, DEFAULT_STATE_DIR
from hostdev.deviceplugin.hostview import HostView
from hostdev.deviceplugin.metrics import Metrics
from hostdev.deviceplugin.plugin import KUBELET_SOCKET, ResourcePlugin, kubelet_holds_endpoint
from hostdev.deviceplugin.resources import ResourceConfig, by_name
from hostdev.deviceplugin.units import ResourceUnits
from hostdev.deviceplugin.wire.rpc import RpcError
from hostdev.host.address import PciAddress, PciAddressError
from hostdev.host.mdevuuid import UUID_RE
from hostdev.host.model import Inventory
from hostdev.host.sysfs import Sysfs

if TYPE_CHECKING:
    from hostdev.deviceplugin.events import DirWatcher, PciEvent, UeventSource
    from hostdev.deviceplugin.mdev import MdevOwner, MdevPlugin, MdevResult, MdevUnits, Writer
    from hostdev.policy.nodestatus import PodDevices

log = logging.getLogger(__name__)


class PluginManager:
    def __init__(
        self,
        sysfs: Sysfs,
        plugin_dir: str = DEFAULT_PLUGIN_DIR,
        state_dir: str | None = DEFAULT_STATE_DIR,
        metrics: Metrics | None = None,
        *,
        debounce: float = 0.003,
        resync_interval: float = 60.0,
        uevents: bool = True,
        save_delay: float = 0.2,
        in_use_source: Callable[[], Iterable[PodDevices]] | None = None,
        mdev_write: Writer | None = None,
    ) -> None:
        self.sysfs = sysfs
        # The mediated-device code (its model, planner and servers) is loaded only for a node
        # with mdev resources or instances it made: ~10 % of the start-up's CPU otherwise.
        self._mdev: MdevOwner | None = None
        self._mdev_write = mdev_write
        self._state_dir = state_dir
        self._mdev_lock = asyncio.Lock()  # one reconcile pass at a time (apply, resync)
        # Instances pods hold of mdev resources since removed: never removed while held
        # (dropped when the kubelet's PodResources list no longer shows them).
        self._mdev_orphans: dict[str, str] = {}
        self.view = HostView(sysfs)
        self.plugin_dir = os.path.abspath(plugin_dir)
        self.state_dir = state_dir
        self.metrics = metrics or Metrics()
        self.debounce = debounce
        self.resync_interval = resync_interval
        self.use_uevents = uevents
        self.save_delay = save_delay
        # Which devices pods hold, from the kubelet's PodResources API (None: never forget).
        self.in_use_source = in_use_source
        self.units: dict[str, ResourceUnits] = {}  # every resource, whichever front end
        self.plugins: dict[str, ResourcePlugin] = {}  # the device-plugin front end's servers
        self._resource_listeners: list[Callable[[], None]] = []
        # unit id -> why: units the DRA front end holds (prepared claims), never healthy for a
        # device-plugin resource (a resource moved back from DRA) until released
        self._held: dict[str, str] = {}
        # More /healthz lines (the DRA front end adds its own): () -> (ok, text)
        self.health_checks: list[Callable[[], tuple[bool, str]]] = []
        self.saved = persist.load(state_dir) if state_dir else {}
        self.scanned = False
        self.uevents_active = False
        self._pending: set[PciAddress] = set()
        self._pending_full = False
        self._wake = asyncio.Event()
        self._kick_handle: asyncio.TimerHandle | None = None
        self._save_handle: asyncio.TimerHandle | None = None
        self._save_lock = threading.Lock()
        self._save_seq = self._saved_seq = 0  # snapshots taken / the newest one written
        self._save_cache = persist.EncodeCache()
        self._register_tasks: dict[str, asyncio.Task[None]] = {}
        self._removing: set[str] = set()  # resources whose server _remove is stopping
        self._tasks: list[asyncio.Task[None]] = []
        self._uevents: UeventSource | None = None
        self._watcher: DirWatcher | None = None
        self._vfio_dir = sysfs.path("dev/vfio")
        self._scan_done = asyncio.Event()
        self._progress = asyncio.Event()  # a scan ended or a list reached the kubelet
        self.scan_count = 0
        self._units_versions: dict[str, int] = {}
        self._warned: frozenset[str] = frozenset()  # discovery warnings logged already

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self, *, watch: bool = True) -> None:
        """Start the rescan worker and the periodic resync, and (``watch``) the event sources.
        Servers start in apply(). The agent starts watching only once the kubelet holds its
        first lists (:meth:`start_watching`): inotify and netlink cost the start-up their
        imports, and nothing they report matters before the first scan."""
        os.makedirs(self.plugin_dir, exist_ok=True)
        self._tasks.append(asyncio.create_task(self._rescan_worker(), name="rescan"))
        self._tasks.append(asyncio.create_task(self._resync_timer(), name="resync"))
        if watch:
            self._watch()

    def start_watching(self) -> None:
        """The event sources, late: what they would have said meanwhile is read again (a full
        rescan), and plugins that found no kubelet socket look again (it may have appeared
        before the plugin directory was watched)."""
        if self._watcher is not None:
            return
        self._watch()
        self.request_full_rescan()
        for plugin in self.plugins.values():
            task = self._register_tasks.get(plugin.resource)
            if plugin.serving and not plugin.registered and (task is None or task.done()):
                self._register_soon(plugin)

    def _watch(self) -> None:
        from hostdev.deviceplugin.events import DirWatcher, UeventSource

        self._watcher = DirWatcher(self._on_dir_event)
        self._watcher.watch(self.plugin_dir)
        self._watcher.watch(self._vfio_dir)
        log.info("watching %s and %s", self.plugin_dir, self._vfio_dir)
        if self.use_uevents:
            src = UeventSource(self.notify)
            try:
                src.open()
                self._uevents = src
                self.uevents_active = True
            except OSError as e:
                log.warning(
                    "kernel uevents unavailable (%s): relying on /dev/vfio inotify and the "
                    "%.0fs resync",
                    e,
                    self.resync_interval,
                )

    async def close(self) -> None:
        for t in [*self._tasks, *self._register_tasks.values()]:
            t.cancel()
        for t in [*self._tasks, *self._register_tasks.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        self._tasks.clear()
        self._register_tasks.clear()
        for h in (self._kick_handle, self._save_handle):
            if h is not None:
                h.cancel()
        self.save_now()  # the lists the kubelet saw last, for the next start
        if self._uevents is not None:
            self._uevents.close()
        if self._watcher is not None:
            self._watcher.close()
        for p in list(self.plugins.values()):
            await p.stop()
        self.plugins.clear()
        self.units.clear()

    # ---- resources ----------------------------------------------------------------------
    @property
    def dra_units(self) -> dict[str, ResourceUnits]:
        """The units of the resources the DRA front end serves."""
        return {n: u for n, u in self.units.items() if u.config.dra}

    def add_resource_listener(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs after every apply() that changed which resources DRA serves."""
        self._resource_listeners.append(listener)

    async def apply(self, resources: Sequence[ResourceConfig]) -> None:
        """Serve exactly ``resources``: start new ones, stop removed ones, update changed ones."""
        wanted = by_name(resources)
        before = {n: u.config for n, u in self.units.items() if u.config.dra}
        for name in list(self.units):
            if name not in wanted:
                await self._remove(name)
        for name, cfg in wanted.items():
            current = self.units.get(name)
            if current is not None and current.config.allocation != cfg.allocation:
                await self._switch(name, cfg)
                continue
            if current is not None:
                if current.config != cfg:
                    log.info("%s: selector or strategy changed; updating in place", name)
                    current.config = cfg
                    if self.scanned:
                        current.update(self.view.inventory)
                        self._check_shared_groups(self.view.inventory)
                continue
            await self._add(cfg)
        if before != {n: u.config for n, u in self.units.items() if u.config.dra}:
            for listener in list(self._resource_listeners):
                listener()
        await self.reconcile_mdev()

    # ---- mediated devices ---------------------------------------------------------------
    @property
    def mdev(self) -> MdevOwner:
        """The mediated-device instances this agent made (created/removed to match resources);
        made, and its module imported, on first use."""
        if self._mdev is None:
            from hostdev.deviceplugin.mdev import MdevOwner, sysfs_write

            self._mdev = MdevOwner(self.sysfs, self._state_dir, self._mdev_write or sysfs_write)
        return self._mdev

    def _may_own_mdevs(self) -> bool:
        """Whether this agent may have made mdev instances (without loading the mdev code when
        it cannot have: no owner yet and no record of instances from an earlier run)."""
        if self._mdev is None and (
            self._state_dir is None or not os.path.exists(persist.mdev_owned_path(self._state_dir))
        ):
            return False
        return bool(self.mdev.owned)

    @property
    def mdev_plugins(self) -> dict[str, MdevPlugin]:
        if all(p.config.mdev is None for p in self.plugins.values()):
            return {}
        from hostdev.deviceplugin.mdev import MdevPlugin

        return {n: p for n, p in self.plugins.items() if isinstance(p, MdevPlugin)}

    @property
    def mdev_units(self) -> dict[str, MdevUnits]:
        """Every mdev resource's instances, device plugin or DRA."""
        if all(u.config.mdev is None for u in self.units.values()):
            return {}
        from hostdev.deviceplugin.mdev import MdevUnits

        return {n: u for n, u in self.units.items() if isinstance(u, MdevUnits)}

    async def reconcile_mdev(self) -> MdevResult | None:
        """Create/remove this agent's mdev instances to match the mdev resources (never one a
        pod was allocated or whose group is open), then show the servers the result."""
        wants = {n: u.config.mdev for n, u in self.units.items() if u.config.mdev is not None}
        if not wants and not self._may_own_mdevs():
            return None
        allocated = dict(self._mdev_orphans)
        for name, p in self.mdev_plugins.items():
            allocated.update((uuid, f"allocated to a pod ({name})") for uuid in p.allocated)
        # Instances prepared DRA claims hold (the DRA front end's held set names them by UUID).
        allocated.update((k, v) for k, v in self._held.items() if UUID_RE.match(k))
        async with self._mdev_lock:
            result = await asyncio.to_thread(self.mdev.reconcile, wants, allocated)
            inv = await asyncio.to_thread(self.mdev.inventory)
        for u in self.mdev_units.values():
            u.update_mdev(inv)
        return result

    async def _add(self, cfg: ResourceConfig, previous: ResourceUnits | None = None) -> None:
        name = cfg.resource_name
        units: ResourceUnits
        if cfg.mdev is not None:  # the mdev code is loaded for mdev resources only
            from hostdev.deviceplugin.mdev import MdevPlugin, MdevUnits
        if cfg.dra and cfg.mdev is not None:
            units = MdevUnits(cfg, self.sysfs, self.metrics, self.mdev)
        elif cfg.dra:
            units = ResourceUnits(cfg, self.sysfs, self.metrics)
        else:
            plugin: ResourcePlugin
            if cfg.mdev is not None:
                plugin = MdevPlugin(
                    cfg,
                    self.sysfs,
                    self.plugin_dir,
                    self.metrics,
                    self.mdev,
                    on_change=self.schedule_save,
                    on_delivered=self._progress.set,
                )
            else:
                plugin = ResourcePlugin(
                    cfg,
                    self.sysfs,
                    self.plugin_dir,
                    self.metrics,
                    on_change=self.schedule_save,
                    on_stale=self._rescan_soon,
                    on_delivered=self._progress.set,
                )
            units = plugin
            saved = self.saved.get(name)
            if previous is None and saved is not None and not self.scanned:
                plugin.seed(saved.devices, saved.allocated)
                log.info(
                    "%s: advertising %d saved devices until the first scan",
                    name,
                    len(saved.devices),
                )
        if previous is not None:
            units.take_over(previous)
        if not cfg.dra:
            units.set_held(self._held)
        self.units[name] = units
        if self.scanned:
            units.update(self.view.inventory)
            self._check_shared_groups(self.view.inventory)
        if isinstance(units, ResourcePlugin):
            self.plugins[name] = units
            await units.start()
            self._register_soon(units)

    async def _switch(self, name: str, cfg: ResourceConfig) -> None:
        """The resource moves to the other front end; its units, verdicts and in-use set come
        along (a unit a pod holds through the old front end is not handed out by the new)."""
        old = self.units[name]
        log.info(
            "%s: now allocated by %s (was %s); units in use stay with their pods",
            name,
            cfg.allocation,
            old.config.allocation,
        )
        await self._drop(name)
        await self._add(cfg, previous=old)
        self.schedule_save()

    async def _drop(self, name: str) -> None:
        """Stop ``name``'s server, remove its socket, then drop it from :attr:`plugins` and
        :attr:`units`: a resource that is gone from the maps is gone from the host too (nobody
        sees a half-removed one). A socket-deleted restart racing with this sees ``_removing``
        and stands down."""
        plugin = self.plugins.get(name)
        self._removing.add(name)
        try:
            task = self._register_tasks.pop(name, None)
            if task is not None:
                task.cancel()
            if plugin is not None:
                await plugin.stop()
        finally:
            self._removing.discard(name)
            if plugin is not None and self.plugins.get(name) is plugin:
                del self.plugins[name]
            self.units.pop(name, None)

    async def _remove(self, name: str) -> None:
        plugin = self.mdev_plugins.get(name)
        if plugin is not None:
            for uuid in plugin.allocated:
                self._mdev_orphans[uuid] = f"allocated to a pod ({name}, since removed)"
        await self._drop(name)
        if self.scanned:
            self._check_shared_groups(self.view.inventory)
        self.metrics.forget(name)
        log.info("%s: resource removed; server stopped", name)
        self.schedule_save()

    def set_held(self, held: dict[str, str]) -> None:
        """Units the DRA front end holds (unit id -> why): device-plugin resources must not
        offer them (see :meth:`ResourceUnits.set_held`)."""
        if held == self._held:
            return
        self._held = dict(held)
        for p in self.plugins.values():
            if p.set_held(held) and self.scanned:
                p.update(self.view.inventory)

    # ---- registration -------------------------------------------------------------------
    @property
    def kubelet_socket(self) -> str:
        return os.path.join(self.plugin_dir, KUBELET_SOCKET)

    def _kubelet_socket_exists(self) -> bool:
        return os.path.exists(self.kubelet_socket)  # one stat: not worth a thread

    def _register_soon(self, plugin: ResourcePlugin) -> None:
        old = self._register_tasks.pop(plugin.resource, None)
        if old is not None:
            old.cancel()
        self._register_tasks[plugin.resource] = asyncio.create_task(
            self._register_loop(plugin), name=f"register {plugin.resource}"
        )

    async def _register_loop(self, plugin: ResourcePlugin) -> None:
        delay = 0.05
        while plugin.serving:
            if not self._kubelet_socket_exists():
                # The directory watch calls us again when the kubelet creates its socket.
                log.info("%s: waiting for %s", plugin.resource, self.kubelet_socket)
                return
            try:
                await plugin.register()
                return
            except RpcError as e:
                if kubelet_holds_endpoint(e, plugin.socket_path):
                    await self._next_socket(plugin)
                else:
                    log.warning(
                        "%s: Register with the kubelet failed (%s: %s); retrying in %.2fs",
                        plugin.resource,
                        e.code_name,
                        e.details,
                        delay,
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _next_socket(self, plugin: ResourcePlugin) -> None:
        """The kubelet refused our socket path as "already connected": its device manager
        (v1.37) still holds an endpoint there whose client it has dropped, so it will never
        let that path register again until it restarts. Serve on a fresh path instead."""
        old = await plugin.next_socket()
        log.warning(
            "%s: the kubelet refuses to register %s again (it keeps a stale endpoint for that "
            "path until it restarts, so it would never see our lists); serving on %s instead",
            plugin.resource,
            old,
            plugin.socket_path,
        )

    def _on_dir_event(self, directory: str, name: str, created: bool) -> None:
        if directory == self.plugin_dir:
            if name == KUBELET_SOCKET and created:
                log.info("kubelet.sock (re)created: registering every resource again")
                for plugin in self.plugins.values():
                    plugin.registered = False
                    self._register_soon(plugin)
            elif name == "" and created:
                # The whole directory was re-created: serve and register again.
                for plugin in self.plugins.values():
                    self._restart_soon(plugin)
            elif not created:
                for plugin in self.plugins.values():
                    if (
                        os.path.basename(plugin.socket_path) == name
                        and plugin.serving
                        and not os.path.exists(plugin.socket_path)
                    ):
                        self._restart_soon(plugin)
        elif directory == self._vfio_dir:
            self._on_vfio_event(name)

    def _restart_soon(self, plugin: ResourcePlugin) -> None:
        async def restart() -> None:
            log.warning(
                "%s: socket %s was deleted; serving again", plugin.resource, plugin.socket_path
            )
            await plugin.stop(remove_socket=False)
            if (
                self.plugins.get(plugin.resource) is plugin
                and plugin.resource not in self._removing
            ):
                await plugin.start()
                self._register_soon(plugin)

        self._spawn(restart(), f"restart {plugin.resource}")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # ---- rescans ------------------------------------------------------------------------
    def notify(self, event: PciEvent) -> None:
        """A PCI event (kernel uevent or injected by tests): rescan what it names, soon."""
        if event.address is None:
            self._pending_full = True
        else:
            self._pending.add(event.address)
        self._kick()

    def _rescan_soon(self, addresses: Iterable[PciAddress]) -> None:
        """Re-read these functions soon (a plugin found them different from its last view)."""
        self._pending.update(addresses)
        self._kick()

    def request_full_rescan(self) -> None:
        self._pending_full = True
        self._kick()

    def _on_vfio_event(self, name: str) -> None:
        if not name.isdigit():
            if name == "":
                # /dev/vfio itself (re)appeared (vfio loaded): every group node may be new.
                self._pending_full = True
            self._kick()  # "vfio", "devices": the node set is re-listed on any refresh
            return
        group = int(name)
        # Re-read the group's members: those we knew and those the kernel lists now.
        inv = self.view.inventory if self.scanned else None
        if inv is not None and group in inv.groups:
            self._pending.update(inv.groups[group].members)
        gdir = self.sysfs.path("sys/kernel/iommu_groups", name, "devices")
        with contextlib.suppress(OSError):
            for entry in os.listdir(gdir):
                with contextlib.suppress(PciAddressError):
                    self._pending.add(PciAddress.parse(entry))
        self._kick()

    def _kick(self) -> None:
        if self._kick_handle is None:
            loop = asyncio.get_running_loop()
            self._kick_handle = loop.call_later(self.debounce, self._wake.set)

    async def _resync_timer(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval)
            await self.refresh_in_use()
            self.request_full_rescan()

    async def refresh_in_use(self) -> None:
        """Ask the kubelet (PodResources) which devices pods hold, so devices freed by ended
        pods may leave the list once they are gone from the host."""
        if self.in_use_source is None:
            return
        try:
            rows = await asyncio.to_thread(self.in_use_source)
        except Exception as e:  # any failure: keep what we believe, try again next resync
            log.warning("cannot read devices in use from the kubelet: %s", e)
            self.metrics.errors.labels("", "pod-resources").inc()
            return
        by_resource: dict[str, set[str]] = {name: set() for name in self.units}
        for row in rows:
            if row.resource_name in by_resource:
                by_resource[row.resource_name].update(row.device_ids)
        for name, ids in by_resource.items():
            self.units[name].set_in_use(ids)
        if self._mdev_orphans:
            held = {d for row in rows for d in row.device_ids}
            self._mdev_orphans = {u: w for u, w in self._mdev_orphans.items() if u in held}

    async def _rescan_worker(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._kick_handle = None
            full, self._pending_full = self._pending_full or not self.scanned, False
            addrs, self._pending = self._pending, set()
            try:
                if full:
                    # Walking every function takes a while on big nodes: keep serving meanwhile.
                    inv = await asyncio.to_thread(self.view.full)
                    self.metrics.rescans.labels("full").inc()
                    self._log_warnings(inv.warnings)
                else:
                    inv = self.view.refresh(addrs)
                    self.metrics.rescans.labels("targeted").inc()
            except OSError as e:
                log.error("host rescan failed: %s; retrying on the next event or resync", e)
                self.metrics.errors.labels("", "rescan").inc()
                continue
            self.scanned = True
            dirty = None if full else self.view.last_dirty
            for units in list(self.units.values()):
                units.update(inv, dirty)
            self._check_shared_groups(inv)
            if full:
                try:
                    await self.reconcile_mdev()  # e.g. a parent that came back
                except OSError as e:
                    log.error("mdev reconcile failed: %s; retrying on the next resync", e)
                    self.metrics.errors.labels("", "mdev").inc()
            self.scan_count += 1
            self._scan_done.set()
            self._scan_done = asyncio.Event()
            self._progress.set()

    def _log_warnings(self, warnings: tuple[str, ...]) -> None:
        """What discovery skipped or could not read (an impossible address such as device
        number 0x20, garbage in an attribute): logged once when it appears, and when it goes."""
        now = frozenset(warnings)
        for w in sorted(now - self._warned):
            log.warning("host scan: %s", w)
        for w in sorted(self._warned - now):
            log.info("host scan: no longer seen: %s", w)
        self._warned = now

    def _check_shared_groups(self, inv: Inventory) -> None:
        """Flag IOMMU groups whose functions are split across resources: each part would be
        allocatable on its own, but VFIO hands a group to one VM only."""
        versions = {name: p.units_version for name, p in self.units.items()}
        if versions == self._units_versions:
            return
        self._units_versions = versions
        owners: dict[int, set[str]] = {}
        for name, p in self.units.items():
            for adv in p.devices.values():
                if adv.unit.group is not None:
                    owners.setdefault(adv.unit.group, set()).add(name)
        for name, p in self.units.items():
            shared = {
                g: tuple(sorted(o - {name})) for g, o in owners.items() if name in o and len(o) > 1
            }
            if p.set_shared_groups(shared):
                if shared:
                    log.warning(
                        "%s: IOMMU group(s) %s shared with other resources: marked Unhealthy",
                        name,
                        ", ".join(map(str, sorted(shared))),
                    )
                p.update(inv)

    async def rescan(self) -> None:
        """A full rescan now; returns when the servers have the result."""
        self.request_full_rescan()
        await self.wait_scan()

    async def wait_served(self, within: float) -> bool:
        """Until the host was scanned and the kubelet holds every device-plugin resource's
        current list (True), or ``within`` seconds passed (False). Without a kubelet socket
        only the scan is waited for. The agent does its slower start-up work after this."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            if self.scanned and (
                not self._kubelet_socket_exists()
                or all(p.kubelet_current for p in self.plugins.values())
            ):
                return True
            left = deadline - loop.time()
            if left <= 0:
                return False
            self._progress.clear()
            try:
                await asyncio.wait_for(self._progress.wait(), left)
            except TimeoutError:
                return False

    async def wait_scan(self) -> None:
        target = self.scan_count
        while self.scan_count <= target:
            await self._scan_done.wait()

    # ---- persistence --------------------------------------------------------------------
    def snapshot(self) -> dict[str, persist.SavedResource]:
        out = dict(self.saved) if not self.scanned else {}
        for name, p in self.plugins.items():
            out[name] = persist.SavedResource(tuple(p.devices.values()), frozenset(p.allocated))
        return out

    def allocated(self) -> dict[PciAddress, str]:
        """Every function the servers handed to a pod (live; see persist.allocated_devices)."""
        return persist.allocated_devices(self.snapshot())

    def schedule_save(self) -> None:
        if self.state_dir is None or self._save_handle is not None:
            return
        loop = asyncio.get_running_loop()
        self._save_handle = loop.call_later(self.save_delay, self._save_async)

    def _save_async(self) -> None:
        self._save_handle = None
        assert self.state_dir is not None
        # The snapshot (immutable device tuples) is taken here; encoding it is left to the
        # writer thread: on a 4,096-VF node it took the event loop 30-100 ms after every
        # Allocate burst, and Allocate calls waited behind it.
        self._save_seq += 1
        snap = self.snapshot()
        self._spawn(asyncio.to_thread(self._write, snap, self._save_seq), "save state")

    def _write(self, snap: Mapping[str, persist.SavedResource], seq: int) -> None:
        assert self.state_dir is not None
        with self._save_lock:  # one writer at a time, and never an older list after a newer
            if seq <= self._saved_seq:
                return
            self._saved_seq = seq
            try:
                persist.save(self.state_dir, persist.encode(snap, self._save_cache))
            except OSError as e:
                log.error("cannot save device lists under %s: %s", self.state_dir, e)
                self.metrics.errors.labels("", "persist").inc()

    def save_now(self) -> None:
        if self.state_dir is not None:
            self._save_seq += 1
            self._write(self.snapshot(), self._save_seq)

    # ---- probes -------------------------------------------------------------------------
    def health(self) -> tuple[bool, str]:
        lines = []
        ok = True
        for name, u in sorted(self.units.items()):
            p = self.plugins.get(name)
            if p is None:
                lines.append(f"{name}: DRA, {len(u.devices)} devices")
                continue
            ok = ok and p.serving
            state = "registered" if p.registered else "not registered"
            if p.socket_generation > 1:  # not the plain socket name: say which one
                state += f" as {os.path.basename(p.socket_path)}"
            lines.append(
                f"{name}: {'serving' if p.serving else 'DOWN'}, {state}, {len(p.devices)} devices"
            )
        for check in self.health_checks:
            more_ok, text = check()
            ok = ok and more_ok
            lines.append(text)
        return ok, "\n".join(lines) or "no resources configured"
