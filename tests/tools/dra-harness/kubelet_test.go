package main

// The kubelet subcommand end to end against the upstream Go DRA driver helper
// (k8s.io/dynamic-resource-allocation/kubeletplugin, the helper Go DRA drivers are built on):
// registration through the registry directory, NodePrepareResources with device metadata,
// the dra-health stream and NodeUnprepareResources, over real gRPC on unix sockets. The API
// server is client-go's fake clientset (the pytest tier uses the real one). The events printed
// here are what hostdev's driver must produce with the same claim.

import (
	"bufio"
	"context"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/klog/v2"
	"k8s.io/klog/v2/ktesting"
	"k8s.io/utils/ptr"
)

const (
	exNode   = "node-1"
	exNS     = "vms"
	exDevice = "pci-0000-17-00-0"
)

// examplePlugin is the smallest driver: every allocated device prepared with one CDI device
// and its PCI address as metadata; health reports pushed by the test.
type examplePlugin struct {
	t      *testing.T
	health chan kubeletplugin.DeviceHealthReport
}

func (p *examplePlugin) PrepareResourceClaims(_ context.Context, claims []*resourceapi.ResourceClaim,
) (map[types.UID]kubeletplugin.PrepareResult, error) {
	out := map[types.UID]kubeletplugin.PrepareResult{}
	for _, c := range claims {
		var devs []kubeletplugin.Device
		for _, r := range c.Status.Allocation.Devices.Results {
			devs = append(devs, kubeletplugin.Device{
				Requests: []string{r.Request}, PoolName: r.Pool, DeviceName: r.Device,
				CDIDeviceIDs: []string{refDriver + "/pci=" + r.Device},
				Metadata: &kubeletplugin.DeviceMetadata{Attributes: map[string]resourceapi.DeviceAttribute{
					"resource.kubernetes.io/pciBusID": {StringValue: ptr.To(refPCIBusID)},
				}},
			})
		}
		out[c.UID] = kubeletplugin.PrepareResult{Devices: devs}
	}
	return out, nil
}

func (p *examplePlugin) UnprepareResourceClaims(_ context.Context, claims []kubeletplugin.NamespacedObject,
) (map[types.UID]error, error) {
	out := map[types.UID]error{}
	for _, c := range claims {
		out[c.UID] = nil
	}
	return out, nil
}

func (p *examplePlugin) HandleError(_ context.Context, err error, msg string) {
	p.t.Errorf("driver background error: %s: %v", msg, err)
}

func (p *examplePlugin) WatchHealthStatus(ctx context.Context, reports chan<- kubeletplugin.DeviceHealthReport) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case r := <-p.health:
			select {
			case reports <- r:
			case <-ctx.Done():
				return nil
			}
		}
	}
}

// eventReader hands out the harness's output lines as they come.
type eventReader struct {
	t      *testing.T
	events chan kubeletEvent
}

func readEvents(t *testing.T, r io.Reader) *eventReader {
	er := &eventReader{t: t, events: make(chan kubeletEvent, 100)}
	go func() {
		defer close(er.events)
		s := bufio.NewScanner(r)
		for s.Scan() {
			var e kubeletEvent
			if err := json.Unmarshal(s.Bytes(), &e); err != nil {
				t.Errorf("bad output line %q: %v", s.Text(), err)
				return
			}
			er.events <- e
		}
	}()
	return er
}

func (er *eventReader) wait(kind string) kubeletEvent {
	er.t.Helper()
	timeout := time.After(60 * time.Second)
	for {
		select {
		case e, ok := <-er.events:
			if !ok {
				er.t.Fatalf("output ended while waiting for %q", kind)
			}
			if e.Event == kind {
				return e
			}
			if e.Event == "error" {
				er.t.Fatalf("error event while waiting for %q: %+v", kind, e)
			}
		case <-timeout:
			er.t.Fatalf("no %q event within 60s", kind)
		}
	}
}

func exampleObjects() (*v1.Node, *v1.Pod, *resourceapi.ResourceClaim) {
	node := &v1.Node{ObjectMeta: metav1.ObjectMeta{Name: exNode, UID: "node-uid"}}
	pod := &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: exNS, Name: "virt-launcher-vm1", UID: "pod-uid-1"},
		Spec: v1.PodSpec{
			NodeName:       exNode,
			ResourceClaims: []v1.PodResourceClaim{{Name: "gpu", ResourceClaimName: ptr.To("gpu-claim")}},
			Containers: []v1.Container{{Name: "compute", Image: "virt-launcher",
				Resources: v1.ResourceRequirements{Claims: []v1.ResourceClaim{{Name: "gpu"}}}}},
		},
	}
	claim := &resourceapi.ResourceClaim{
		ObjectMeta: metav1.ObjectMeta{Namespace: exNS, Name: "gpu-claim", UID: "claim-uid-1"},
		Status: resourceapi.ResourceClaimStatus{
			Allocation: &resourceapi.AllocationResult{Devices: resourceapi.DeviceAllocationResult{
				Results: []resourceapi.DeviceRequestAllocationResult{{
					Request: "gpu", Driver: refDriver, Pool: exNode, Device: exDevice,
				}},
			}},
			ReservedFor: []resourceapi.ResourceClaimConsumerReference{
				{Resource: "pods", Name: pod.Name, UID: pod.UID},
			},
		},
	}
	return node, pod, claim
}

func TestKubeletWithUpstreamDriverHelper(t *testing.T) {
	logger, ctx := ktesting.NewTestContext(t)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	node, pod, claim := exampleObjects()
	client := fake.NewClientset(node, pod, claim)

	dir, err := os.MkdirTemp("", "drak") // short: unix socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = os.RemoveAll(dir) })
	registry, data, cdiDir := filepath.Join(dir, "registry"), filepath.Join(dir, "plugin"), filepath.Join(dir, "cdi")
	for _, d := range []string{registry, data, cdiDir} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			t.Fatal(err)
		}
	}

	// The kubelet first, as on a node (it wipes the node's slices when it starts).
	inR, inW := io.Pipe()
	outR, outW := io.Pipe()
	done := make(chan error, 1)
	go func() {
		done <- serveKubelet(klog.NewContext(ctx, logger), client, kubeletOptions{
			node: exNode, registryDir: registry, stateDir: filepath.Join(dir, "state"), namespace: exNS,
		}, inR, outW)
		_ = outW.Close()
	}()
	events := readEvents(t, outR)
	events.wait("ready")
	send := func(cmd string) {
		if _, err := io.WriteString(inW, cmd+"\n"); err != nil {
			t.Fatal(err)
		}
	}

	plugin := &examplePlugin{t: t, health: make(chan kubeletplugin.DeviceHealthReport)}
	helper, err := kubeletplugin.Start(ctx, plugin,
		kubeletplugin.KubeClient(client), kubeletplugin.NodeName(exNode), kubeletplugin.NodeUID(node.UID),
		kubeletplugin.DriverName(refDriver),
		kubeletplugin.RegistrarDirectoryPath(registry), kubeletplugin.PluginDataDirectoryPath(data),
		kubeletplugin.CDIDirectory(cdiDir),
		kubeletplugin.EnableDeviceMetadata(true, []schema.GroupVersion{v1beta1, v1alpha1}))
	if err != nil {
		t.Fatal(err)
	}
	defer helper.Stop()

	reg := events.wait("registered")
	if reg.Driver != refDriver || !slices.Contains(reg.Services, "v1.DRAPlugin") ||
		!slices.Contains(reg.Services, "v1.DRAResourceHealth") {
		t.Errorf("registered %+v", reg)
	}

	send("prepare " + pod.Name)
	prepared := events.wait("prepared")
	var ids []string
	raw, _ := json.Marshal(prepared.Containers["compute"])
	if err := json.Unmarshal(raw, &ids); err != nil {
		t.Fatal(err)
	}
	slices.Sort(ids)
	want := []string{refDriver + "/metadata=" + string(claim.UID) + "_gpu", refDriver + "/pci=" + exDevice}
	if !slices.Equal(ids, want) {
		t.Errorf("CDI devices of container compute: %v, want %v", ids, want)
	}
	hostFile := filepath.Join(data, "dra-device-metadata", exNS+"_gpu-claim", "gpu", "metadata.json")
	if md, err := decodeMetadataFile(hostFile); err != nil || md.Devices[0].PCIBusID != refPCIBusID {
		t.Errorf("metadata file: %+v, %v", md, err)
	}

	// A dra-health report for the prepared device reaches the container's status.
	plugin.health <- kubeletplugin.DeviceHealthReport{Devices: []kubeletplugin.DeviceHealth{{
		PoolName: exNode, DeviceName: exDevice, Health: kubeletplugin.HealthStatusUnhealthy,
		LastUpdated: time.Now(), Message: "0000:17:00.0 left vfio-pci",
	}}}
	health := events.wait("health")
	var statuses []v1.ResourceStatus
	raw, _ = json.Marshal(health.Containers["compute"])
	if err := json.Unmarshal(raw, &statuses); err != nil {
		t.Fatal(err)
	}
	if len(statuses) != 1 || statuses[0].Name != "claim:gpu" || len(statuses[0].Resources) != 1 ||
		statuses[0].Resources[0].Health != v1.ResourceHealthStatusUnhealthy ||
		// The device's first CDI ID (<driver>/<pool>/<device> only for devices without one).
		statuses[0].Resources[0].ResourceID != v1.ResourceID(refDriver+"/pci="+exDevice) ||
		ptr.Deref(statuses[0].Resources[0].Message, "") != "0000:17:00.0 left vfio-pci" {
		t.Errorf("allocatedResourcesStatus %+v", statuses)
	}

	send("unprepare " + pod.Name)
	events.wait("unprepared")
	if _, err := os.Stat(hostFile); !os.IsNotExist(err) {
		t.Errorf("metadata file still there after unprepare: %v", err)
	}
	send("prepare no-such-pod")
	if e := events.wait("error"); e.Command != "prepare no-such-pod" {
		t.Errorf("error event %+v", e)
	}
	_ = inW.Close()
	if err := <-done; err != nil {
		t.Fatalf("serveKubelet: %v", err)
	}
}
