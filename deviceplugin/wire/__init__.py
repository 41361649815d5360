"""The node agent's own kubelet wire: gRPC over HTTP/2 on unix sockets, protobuf messages.

The agent speaks a handful of kubelet RPCs (device plugin, plugin registration, DRA, dra-health,
PodResources). grpcio costs ~0.1 s and ~26 MiB just to import, more than the whole start-up
budget of a small node, so these modules implement the part of gRPC the agent uses: unary and
server-streaming calls over HTTP/2 cleartext on unix sockets (:mod:`.h2`, :mod:`.rpc`), with the
messages encoded by small schemas (:mod:`.pb`, :mod:`.messages`) that tests check against the
``.proto`` files and the generated stubs (``deviceplugin/api``), and against grpcio and the
kubelet's own Go code on the other end.
"""
