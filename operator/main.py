"""``hostdev-operator``: the kopf operator process.

Settings kopf and the API client need, all set here:

- Login: in-cluster service account, else ``$KUBECONFIG`` / ``--kubeconfig``
  (:func:`hostdev.operator.kube.credentials`), read by the shared client
  (:mod:`hostdev.kube.client`), not the ``kubernetes`` package: kopf's session
  (:mod:`hostdev.operator.login`), the operator's own calls and the Lease use the same
  credentials.
- Leader election: a ``coordination.k8s.io/v1`` Lease (``--leader-elect --lease-namespace NS``,
  see :mod:`hostdev.operator.leader`): only the holder runs kopf at all; the others stand by
  and take over when it releases the lease (graceful stop) or lets it expire. Without it (the
  default, ``--standalone``) run exactly one replica. kopf itself always runs standalone.
- Persistence (:mod:`hostdev.operator.persistence`): kopf's diff base lives in
  ``status.lastHandledConfiguration`` (declared in the PassthroughRequest schema; the only kind
  with create/update handlers), so the handler's status and the diff base go out as one
  write. Handler progress (retries only) stays in annotations prefixed ``hostdev.io``, without
  kopf's marker annotation; the finalizer is ``hostdev.io/finalizer``.
- Events: only explicit state changes post Kubernetes Events (``settings.posting.loggers``
  stays off, so log lines are not turned into Events).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import os
import signal
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from aiohttp import web
from prometheus_client import start_http_server

from hostdev.kube import DEFAULT_SERVICE_ACCOUNT_DIR
from hostdev.kube.client import ApiClient
from hostdev.operator import heap
from hostdev.operator import login as kopf_login
from hostdev.operator.cluster import Cluster
from hostdev.operator.handlers import cluster as _cluster_handlers  # noqa: F401  (registers)
from hostdev.operator.handlers import reconfigure as _reconfigure  # noqa: F401  (registers)
from hostdev.operator.handlers import requests as _request_handlers  # registers; refresh
from hostdev.operator.kopf_plain import kopf
from hostdev.operator.kube import USER_AGENT, Api, Core, credentials
from hostdev.operator.leader import Elector, LeaseSettings, default_identity
from hostdev.operator.persistence import DiffBase, Progress
from hostdev.operator.reconfigure import Reconfigurer
from hostdev.operator.refresher import Refresher

log = logging.getLogger("hostdev.operator")

# The kopf indexes the cluster pass reads (handed over at startup by name).
INDEXES = (
    "policies_idx",
    "nodes_idx",
    "nodestates_idx",
    "kubevirts_idx",
    "deviceclasses_idx",
    "reconfigure_vmis_idx",
    "eviction_defaults_idx",
    "cordon_idx",
)


@kopf.on.login()
async def login(**_: Any) -> kopf.AiohttpSession:
    return kopf_login.session(credentials())


# kopf keeps one worker task per object while its events are handled, and by default for 5 s
# after its last one, holding that object's last body. In a 1,000-request burst that kept
# hundreds of finished requests' workers alive beside the busy ones, and the operator's memory
# does not shrink back after such a peak (bench/operator_requests.py: ~107 -> ~99 MiB after
# the burst). A worker waiting for its own patch to come back stays anyway (kopf's consistency
# wait); a later event just starts a new worker.
WORKER_IDLE_S = 0.25


def tune(settings: kopf.OperatorSettings) -> None:
    """kopf's settings for this operator (pure: only sets fields of ``settings``)."""
    settings.persistence.finalizer = "hostdev.io/finalizer"
    settings.persistence.progress_storage = Progress()
    settings.persistence.diffbase_storage = DiffBase()
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    # Watches reconnect on their own every 10 minutes so a silently dead stream cannot linger.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    # Not settings.queueing.worker_limit: kopf's workers wait until every indexed object of
    # every kind is indexed, so a limit below the number of Nodes deadlocks the first pass
    # (seen with 400 workers and 2,000 Nodes in bench/operator_cluster.py).
    settings.queueing.idle_timeout = WORKER_IDLE_S


@kopf.on.startup()
async def configure(*, settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
    tune(settings)
    api = Api()
    cluster = Cluster(api)
    # kopf hands every handler its indexes by name; the reconcile loop keeps these live views.
    cluster.use(**{k: kwargs[k] for k in INDEXES})
    cluster.reconfigurer = Reconfigurer(Core(api), cluster.post, cluster.mark)
    # kopf gives each object a shallow copy of this memo: shared state must exist here, now.
    memo["api"] = api
    memo["cluster"] = cluster
    memo["vm_locks"] = {}
    memo["vm_cache"] = {}
    memo["node_labels"] = {}
    # One task refreshes every applied request's status (not a kopf timer per request); the
    # request handlers' events start it and wake it.
    memo["refresher"] = Refresher(
        look=functools.partial(
            _request_handlers.refresh, memo, kwargs["vmis_idx"], kwargs["vms_idx"]
        ),
        requests=kwargs["requests_idx"],
        changes=cluster.next_change,
    )


@kopf.on.cleanup()
async def stop(*, memo: Any, **_: Any) -> None:
    cluster = memo.get("cluster")
    if cluster is not None:
        cluster.stop()
    refresher = memo.get("refresher")
    if refresher is not None:
        refresher.stop()
    # kopf stopped on its own SIGTERM handler: settle the stop flag it was given too, or kopf
    # waits 5 s for its still-pending waiter task (delaying the Lease release by as much).
    flag = memo.get("stop_flag")
    if flag is not None:
        flag.set()


SA_NAMESPACE = os.path.join(DEFAULT_SERVICE_ACCOUNT_DIR, "namespace")


def _namespace(given: str | None) -> str | None:
    if given:
        return given
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    try:
        with open(SA_NAMESPACE, encoding="utf-8") as f:
            return f.read().strip() or None
    except OSError:
        return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hostdev-operator", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--leader-elect",
        action="store_true",
        help="run only while holding a coordination.k8s.io Lease (several replicas: one leads)",
    )
    mode.add_argument(
        "--standalone", action="store_true", help="no leader election (one replica only)"
    )
    p.add_argument("--lease-name", default="hostdev-operator", help="Lease name")
    p.add_argument(
        "--lease-namespace",
        help="Lease namespace (default: $POD_NAMESPACE, else the service account's namespace)",
    )
    p.add_argument(
        "--lease-identity",
        default=os.environ.get("POD_NAME") and f"{os.environ['POD_NAME']}_{os.getpid()}",
        help="this replica's name in the Lease (default: $POD_NAME_pid, else hostname_random)",
    )
    p.add_argument("--lease-duration", type=float, default=15.0, help="seconds (default 15)")
    p.add_argument("--renew-deadline", type=float, default=10.0, help="seconds (default 10)")
    p.add_argument("--retry-period", type=float, default=2.0, help="seconds (default 2)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port; 0: off")
    p.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.leader_elect:
        args.lease_namespace = _namespace(args.lease_namespace)
        if not args.lease_namespace:
            p.error("--leader-elect needs --lease-namespace (or $POD_NAMESPACE)")
        try:
            lease_settings(args).check()
        except ValueError as e:
            p.error(str(e))
    return args


def lease_settings(args: argparse.Namespace) -> LeaseSettings:
    return LeaseSettings(
        name=args.lease_name,
        namespace=args.lease_namespace,
        identity=args.lease_identity or default_identity(),
        duration=args.lease_duration,
        renew_deadline=args.renew_deadline,
        retry=args.retry_period,
    )


async def run_kopf(args: argparse.Namespace, stop: asyncio.Event | None = None) -> None:
    trimming = heap.start()  # memory back to the OS after bursts (see hostdev.operator.heap)
    try:
        await kopf.operator(
            clusterwide=True,
            standalone=True,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(stop_flag=stop),
            stop_flag=stop,
        )
    finally:
        if trimming is not None:
            trimming.cancel()


async def _standby_liveness(url: str | None, elector: Elector) -> web.AppRunner | None:
    """A standby runs no kopf, so no kopf liveness endpoint: answer the probe here (healthy
    while the lease loop reaches the API server) until kopf takes the port over."""
    if not url:
        return None
    where = urlparse(url)

    async def healthz(_: web.Request) -> web.Response:
        age = elector.clock() - elector.last_seen
        ok = age < 3 * elector.s.renew_deadline
        return web.json_response({"standby": True, "apiSeenAgo": round(age, 1)},
                                 status=200 if ok else 503)  # fmt: skip

    app = web.Application()
    app.router.add_get(where.path or "/", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, where.hostname, where.port).start()
    return runner


async def run_elected(args: argparse.Namespace) -> int:
    """Stand by until the Lease is ours, run kopf while it is, release it on a clean stop."""
    settings = lease_settings(args)
    api = ApiClient(credentials(), user_agent=USER_AGENT)
    elector = Elector(api, settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("standing by for Lease %s/%s as %s", settings.namespace, settings.name,
             settings.identity)  # fmt: skip
    probe = await _standby_liveness(args.liveness, elector)
    try:
        leading = await elector.acquire(stop)
    finally:
        if probe is not None:
            await probe.cleanup()
    if not leading:
        api.close()
        return 0
    log.info("leading: Lease %s/%s acquired as %s", settings.namespace, settings.name,
             settings.identity)  # fmt: skip
    renewing, halt = elector.keep(_lost)
    try:
        await run_kopf(args, stop)
    finally:
        # kopf stopped (SIGTERM, or it failed): renewed until here, now let go at once.
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)  # kopf had replaced ours with its own
        halt.set()
        await asyncio.to_thread(renewing.join)
        await elector.release()
        api.close()
    return 0


def _lost(why: str) -> None:
    """Another replica may take over once the lease expires: stop writing now, from the renewal
    thread (kopf's loop may be busy), not after a graceful kopf shutdown that could outlast the
    lease. The Deployment restarts the pod, which then stands by."""
    log.error("leadership lost (%s): exiting so that nothing writes without it", why)
    logging.shutdown()
    os._exit(1)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # kopf logs every handler run ("Handler 'x' succeeded") at INFO: on a cluster with many
        # nodes and requests that is most of the log. Failures and retries stay visible.
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    if args.kubeconfig:
        os.environ["KUBECONFIG"] = args.kubeconfig
    if args.metrics_port:
        start_http_server(args.metrics_port)
    if args.leader_elect:
        raise SystemExit(asyncio.run(run_elected(args)))
    asyncio.run(run_kopf(args))


if __name__ == "__main__":
    main()
