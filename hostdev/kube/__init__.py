"""Kubernetes API access shared by the node agent and the operator (:mod:`.client`).

This package's own module is imported on the agent's start path (its flags name the
service-account directory), so it holds constants only: the client loads ``socket`` and
``ssl``, which the agent's file mode never needs.
"""

DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
