"""kopf's settings as the operator sets them (hostdev.operator.main.tune)."""

from __future__ import annotations

import kopf

from hostdev.operator.main import WORKER_IDLE_S, tune
from hostdev.operator.persistence import DiffBase, Progress


def test_tune_sets_bookkeeping_watches_and_worker_lifetime() -> None:
    default = kopf.OperatorSettings()
    settings = kopf.OperatorSettings()
    tune(settings)
    assert settings.persistence.finalizer == "hostdev.io/finalizer"
    assert isinstance(settings.persistence.progress_storage, Progress)
    assert isinstance(settings.persistence.diffbase_storage, DiffBase)
    assert settings.posting.loggers is False
    assert (settings.watching.server_timeout, settings.watching.client_timeout) == (600, 660)
    # Finished objects' workers go soon (their last bodies are the burst's memory peak) ...
    assert settings.queueing.idle_timeout == WORKER_IDLE_S < default.queueing.idle_timeout
    # ... and nothing limits the workers: a limit below the Node count deadlocks the first pass.
    assert settings.queueing.worker_limit is None
    # kopf's wait for a patched object's own change is kept as it is.
    assert settings.persistence.consistency_timeout == default.persistence.consistency_timeout
