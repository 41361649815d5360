"""The kubelet API messages the agent sends and reads, as :mod:`.pb` schemas, and the gRPC
method paths. Written from the ``.proto`` files in ``deviceplugin/api`` (the contracts);
``tests/deviceplugin/test_wire.py`` checks every schema against the generated descriptors."""

from __future__ import annotations

from hostdev.deviceplugin.wire.pb import Schema, boolean, integer, message, string, string_map

EMPTY = Schema("Empty")

# ---- deviceplugin/v1beta1 (package v1beta1) ------------------------------------------------
DEVICE_PLUGIN_OPTIONS = Schema(
    "DevicePluginOptions",
    boolean(1, "pre_start_required"),
    boolean(2, "get_preferred_allocation_available"),
)
REGISTER_REQUEST = Schema(
    "RegisterRequest",
    string(1, "version"),
    string(2, "endpoint"),
    string(3, "resource_name"),
    message(4, "options", DEVICE_PLUGIN_OPTIONS),
)
NUMA_NODE = Schema("NUMANode", integer(1, "ID"))
TOPOLOGY_INFO = Schema("TopologyInfo", message(1, "nodes", NUMA_NODE, repeated=True))
DEVICE = Schema(
    "Device", string(1, "ID"), string(2, "health"), message(3, "topology", TOPOLOGY_INFO)
)
LIST_AND_WATCH_RESPONSE = Schema(
    "ListAndWatchResponse", message(1, "devices", DEVICE, repeated=True)
)
PRE_START_CONTAINER_REQUEST = Schema(
    "PreStartContainerRequest", string(1, "devices_ids", repeated=True)
)
PRE_START_CONTAINER_RESPONSE = Schema("PreStartContainerResponse")
CONTAINER_PREFERRED_ALLOCATION_REQUEST = Schema(
    "ContainerPreferredAllocationRequest",
    string(1, "available_deviceIDs", repeated=True),
    string(2, "must_include_deviceIDs", repeated=True),
    integer(3, "allocation_size"),
)
PREFERRED_ALLOCATION_REQUEST = Schema(
    "PreferredAllocationRequest",
    message(1, "container_requests", CONTAINER_PREFERRED_ALLOCATION_REQUEST, repeated=True),
)
CONTAINER_PREFERRED_ALLOCATION_RESPONSE = Schema(
    "ContainerPreferredAllocationResponse", string(1, "deviceIDs", repeated=True)
)
PREFERRED_ALLOCATION_RESPONSE = Schema(
    "PreferredAllocationResponse",
    message(1, "container_responses", CONTAINER_PREFERRED_ALLOCATION_RESPONSE, repeated=True),
)
CONTAINER_ALLOCATE_REQUEST = Schema(
    "ContainerAllocateRequest", string(1, "devices_ids", repeated=True)
)
ALLOCATE_REQUEST = Schema(
    "AllocateRequest", message(1, "container_requests", CONTAINER_ALLOCATE_REQUEST, repeated=True)
)
CDI_DEVICE = Schema("CDIDevice", string(1, "name"))
MOUNT = Schema(
    "Mount", string(1, "container_path"), string(2, "host_path"), boolean(3, "read_only")
)
DEVICE_SPEC = Schema(
    "DeviceSpec", string(1, "container_path"), string(2, "host_path"), string(3, "permissions")
)
CONTAINER_ALLOCATE_RESPONSE = Schema(
    "ContainerAllocateResponse",
    string_map(1, "envs"),
    message(2, "mounts", MOUNT, repeated=True),
    message(3, "devices", DEVICE_SPEC, repeated=True),
    string_map(4, "annotations"),
    message(5, "cdi_devices", CDI_DEVICE, repeated=True),
)
ALLOCATE_RESPONSE = Schema(
    "AllocateResponse",
    message(1, "container_responses", CONTAINER_ALLOCATE_RESPONSE, repeated=True),
)

REGISTER = "/v1beta1.Registration/Register"
DEVICE_PLUGIN_SERVICE = "/v1beta1.DevicePlugin/"

# ---- podresources/v1 (package v1): only what the agent reads ----------------------------
POD_TOPOLOGY_INFO = Schema("TopologyInfo", message(1, "nodes", NUMA_NODE, repeated=True))
CONTAINER_DEVICES = Schema(
    "ContainerDevices",
    string(1, "resource_name"),
    string(2, "device_ids", repeated=True),
    message(3, "topology", POD_TOPOLOGY_INFO),
)
CLAIM_RESOURCE = Schema(
    "ClaimResource",
    message(1, "cdi_devices", CDI_DEVICE, repeated=True),
    string(2, "driver_name"),
    string(3, "pool_name"),
    string(4, "device_name"),
)
DYNAMIC_RESOURCE = Schema(
    "DynamicResource",
    string(2, "claim_name"),
    string(3, "claim_namespace"),
    message(4, "claim_resources", CLAIM_RESOURCE, repeated=True),
)
CONTAINER_RESOURCES = Schema(
    "ContainerResources",
    string(1, "name"),
    message(2, "devices", CONTAINER_DEVICES, repeated=True),
    integer(3, "cpu_ids", repeated=True),
    message(5, "dynamic_resources", DYNAMIC_RESOURCE, repeated=True),
)
POD_RESOURCES = Schema(
    "PodResources",
    string(1, "name"),
    string(2, "namespace"),
    message(3, "containers", CONTAINER_RESOURCES, repeated=True),
)
LIST_POD_RESOURCES_RESPONSE = Schema(
    "ListPodResourcesResponse", message(1, "pod_resources", POD_RESOURCES, repeated=True)
)
POD_RESOURCES_LIST = "/v1.PodResourcesLister/List"

# ---- pluginregistration/v1 (package pluginregistration) ---------------------------------
PLUGIN_INFO = Schema(
    "PluginInfo",
    string(1, "type"),
    string(2, "name"),
    string(3, "endpoint"),
    string(4, "supported_versions", repeated=True),
)
REGISTRATION_STATUS = Schema(
    "RegistrationStatus", boolean(1, "plugin_registered"), string(2, "error")
)
REGISTRATION_STATUS_RESPONSE = Schema("RegistrationStatusResponse")
INFO_REQUEST = Schema("InfoRequest")
PLUGIN_REGISTRATION_SERVICE = "/pluginregistration.Registration/"

# ---- dra/v1 and dra/v1beta1 (the same messages; v1 adds Device.share_id) -----------------
CLAIM = Schema("Claim", string(1, "namespace"), string(2, "uid"), string(3, "name"))
NODE_PREPARE_RESOURCES_REQUEST = Schema(
    "NodePrepareResourcesRequest", message(1, "claims", CLAIM, repeated=True)
)
NODE_UNPREPARE_RESOURCES_REQUEST = Schema(
    "NodeUnprepareResourcesRequest", message(1, "claims", CLAIM, repeated=True)
)
DRA_DEVICE = Schema(
    "Device",
    string(1, "request_names", repeated=True),
    string(2, "pool_name"),
    string(3, "device_name"),
    string(4, "cdi_device_ids", repeated=True),
    string(5, "share_id", optional=True),
)
NODE_PREPARE_RESOURCE_RESPONSE = Schema(
    "NodePrepareResourceResponse",
    message(1, "devices", DRA_DEVICE, repeated=True),
    string(2, "error"),
)
NODE_PREPARE_RESOURCES_RESPONSE = Schema(
    "NodePrepareResourcesResponse", string_map(1, "claims", NODE_PREPARE_RESOURCE_RESPONSE)
)
NODE_UNPREPARE_RESOURCE_RESPONSE = Schema("NodeUnprepareResourceResponse", string(1, "error"))
NODE_UNPREPARE_RESOURCES_RESPONSE = Schema(
    "NodeUnprepareResourcesResponse", string_map(1, "claims", NODE_UNPREPARE_RESOURCE_RESPONSE)
)
DRA_SERVICES = (
    "/k8s.io.kubelet.pkg.apis.dra.v1.DRAPlugin/",
    "/k8s.io.kubelet.pkg.apis.dra.v1beta1.DRAPlugin/",
)

# ---- drahealth/v1 and v1alpha1 (the same messages) ---------------------------------------
HEALTHY, UNHEALTHY = 1, 2  # HealthStatus (UNKNOWN = 0)
DEVICE_IDENTIFIER = Schema("DeviceIdentifier", string(1, "pool_name"), string(2, "device_name"))
DEVICE_HEALTH = Schema(
    "DeviceHealth",
    message(1, "device", DEVICE_IDENTIFIER),
    integer(2, "health"),
    integer(3, "last_updated_time"),
    integer(4, "health_check_timeout_seconds"),
    string(5, "message"),
)
NODE_WATCH_RESOURCES_RESPONSE = Schema(
    "NodeWatchResourcesResponse", message(1, "devices", DEVICE_HEALTH, repeated=True)
)
HEALTH_SERVICES = ("/v1.DRAResourceHealth/", "/v1alpha1.DRAResourceHealth/")
