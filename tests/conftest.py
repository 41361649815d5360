"""Root conftest: registers the shared fixture modules of tests/fixtures/."""

pytest_plugins = [
    "tests.fixtures.kubeletsim",
    "tests.fixtures.kube",
    "tests.fixtures.kubelet",
    "tests.fixtures.operator",
    "tests.fixtures.kernel",
    "tests.fixtures.nodeagent",
    "tests.fixtures.kubevirt",
    "tests.fixtures.draharness",
]
