"""The node agent's cluster mode: this node's PassthroughNodeState -> configuration, device-plugin
resources and status (``loop``), with the kubelet allocation report (``allocations``)."""
