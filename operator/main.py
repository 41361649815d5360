"""``hostdev-operator``: the kopf operator process.

Settings kopf and the kubernetes client need, all set here:

- Login: ``kopf.login_via_client`` (in-cluster service account, else ``$KUBECONFIG`` /
  ``--kubeconfig``); the operator's own calls use the same kubernetes client configuration.
- Leader election: kopf peering. With two replicas run both with ``--peering hostdev`` (needs
  kopf's ``ClusterKopfPeering`` CRD, ``clusterkopfpeerings.kopf.dev``, and an object named
  ``hostdev``): only the peer with the highest ``--priority`` handles events, the others pause.
  Without peering (the default, ``--standalone``) run exactly one replica.
- Persistence: kopf's handler progress and diff-base live in annotations prefixed
  ``hostdev.io`` (our status schema has no ``kopf`` field, so status storage would be pruned),
  the finalizer is ``hostdev.io/finalizer``.
- Events: only explicit state changes post Kubernetes Events (``settings.posting.loggers``
  stays off, so log lines are not turned into Events).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
from collections.abc import Sequence
from typing import Any

import kopf
from prometheus_client import start_http_server

from hostdev.operator.cluster import Cluster
from hostdev.operator.handlers import cluster as _cluster_handlers  # noqa: F401  (registers)
from hostdev.operator.handlers import reconfigure as _reconfigure  # noqa: F401  (registers)
from hostdev.operator.handlers import requests as _request_handlers  # noqa: F401  (registers)
from hostdev.operator.kube import Api, Core
from hostdev.operator.reconfigure import Reconfigurer

log = logging.getLogger("hostdev.operator")

# The kopf indexes the cluster pass reads (handed over at startup by name).
INDEXES = (
    "policies_idx",
    "nodes_idx",
    "nodestates_idx",
    "kubevirts_idx",
    "reconfigure_vmis_idx",
    "eviction_defaults_idx",
    "cordon_idx",
)


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    return kopf.login_via_client(**kwargs)


@kopf.on.startup()
async def configure(*, settings: kopf.OperatorSettings, memo: Any, **kwargs: Any) -> None:
    settings.persistence.finalizer = "hostdev.io/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="hostdev.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="hostdev.io", key="last-handled-configuration"
    )
    settings.posting.loggers = False
    settings.posting.level = logging.INFO
    # Watches reconnect on their own every 10 minutes so a silently dead stream cannot linger.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
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


@kopf.on.cleanup()
async def stop(*, memo: Any, **_: Any) -> None:
    cluster = memo.get("cluster")
    if cluster is not None:
        cluster.stop()


def _priority(text: str) -> int:
    if text == "random":
        return secrets.randbelow(2**31 - 1) + 1
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'random', got {text!r}") from None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hostdev-operator", description=__doc__.splitlines()[0])
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    peer = p.add_mutually_exclusive_group()
    peer.add_argument("--peering", metavar="NAME", help="kopf peering object for leader election")
    peer.add_argument("--standalone", action="store_true", help="no peering (one replica only)")
    p.add_argument(
        "--priority",
        type=_priority,
        default=0,
        help="peering priority (highest leads), or 'random': a fresh 31-bit one per process, so "
        "replicas of one Deployment never tie (kopf pauses every peer of an equal priority)",
    )
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port; 0: off")
    p.add_argument(
        "--liveness", default=None, help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


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
    standalone = args.peering is None
    asyncio.run(
        kopf.operator(
            clusterwide=True,
            standalone=standalone,
            peering_name=args.peering,
            priority=args.priority,
            liveness_endpoint=args.liveness,
            memo=kopf.Memo(),
        )
    )


if __name__ == "__main__":
    main()
