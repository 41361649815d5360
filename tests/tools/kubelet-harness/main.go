// Command kubelet-harness runs the REAL kubelet device manager
// (k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.ManagerImpl, the code a kubelet runs) against a
// device-plugin socket directory, so device plugins can be tested against kubelet's own
// registration, ListAndWatch, GetPreferredAllocation, Allocate and PreStartContainer handling.
//
// Usage:
//
//	kubelet-harness --dir DIR --resource NAME [--expect N] [--allocatable] [--poll D]
//	                [--allocate K] [--timeout D] [--watch-seconds S] [--numa-nodes M]
//	                [--rpc-rounds N --rpc-socket PATH [--rpc-callers C]] [--v LEVEL]
//
// Flags:
//
//	--dir DIR          plugin socket directory; the harness serves DIR/kubelet.sock (Registration)
//	                   and dials DIR/<endpoint> of each registering plugin. Like a starting kubelet
//	                   it first deletes every socket already in DIR (not the checkpoint file), so
//	                   plugins must (re-)register when kubelet.sock appears.
//	--resource NAME    extended resource to wait for / allocate, e.g. hostdev.io/nic.
//	--expect N         wait until capacity (healthy + unhealthy) of NAME is >= N (default 1;
//	                   0 = do not wait).
//	--allocatable      wait for the allocatable (healthy) count instead of capacity.
//	--poll D           how often the manager's counts are read while waiting (Go duration,
//	                   default 100ms, as often as --watch-seconds polls); benchmarks use 2ms.
//	--timeout D        how long to wait for --expect (Go duration, default 30s).
//	--allocate K       allocate K devices of NAME to a fake pod/container through the manager's
//	                   Allocate path (GetPreferredAllocation if the plugin offers it, Allocate RPC,
//	                   then GetDeviceRunContainerOptions incl. PreStartContainer); 0 = skip.
//	--watch-seconds S  after the result line, keep running S seconds and print one JSON line per
//	                   change of capacity/allocatable (polled every 100ms, as kubelet's node status
//	                   would see it), then exit 0.
//	--numa-nodes M     NUMA node ids 0..M-1 the fake machine has (default 1).
//	--rpc-rounds N     after the wait, make N Allocate calls (one allocatable device each, in
//	                   turn) straight to the plugin at --rpc-socket with grpc-go, as the
//	                   manager's client does, over C concurrent callers (--rpc-callers, default
//	                   1); latencies as seen by the caller go to "rpc_rounds" (benchmarks).
//	--rpc-settled-file PATH  then wait until PATH exists (the caller creates it once the plugin
//	                   has finished starting up) and make the N calls again: "rpc_rounds_settled".
//	--v LEVEL          kubelet log verbosity on stderr (default 0; 4 shows the RPCs).
//
// Stdout: first line is ONE JSON object
//
//	{"resource": "...", "capacity": {...}, "allocatable": {...},
//	 "devices": {"<resource>": [{"id": "...", "health": "Healthy", "numa_nodes": [0]}]},
//	 "allocate": {"pod_uid": "...", "container": "...", "device_ids": [...], "envs": {...},
//	              "devices": [{"host_path", "container_path", "permissions"}],
//	              "mounts": [...], "annotations": {...}, "cdi_devices": [...]},   // if --allocate
//	 "preferred_called": bool, "prestart_called": bool,
//	 "met_unix": s,   // wall-clock time (Unix seconds) the --expect wait was first satisfied
//	 "rpc_rounds": {"calls", "callers", "p50_ms", "p99_ms", "max_ms", "mean_ms", "errors"},
//	 "rpc_rounds_settled": {...}}   // same fields, with --rpc-settled-file
//
// then, with --watch-seconds, lines {"elapsed": s, "capacity": {...}, "allocatable": {...}}.
// Exit status: 0 on success; 1 with a message on stderr on timeout or any error; 2 on bad flags.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"sort"
	"strings"
	"sync/atomic"
	"syscall"
	"time"
	_ "unsafe" // for go:linkname

	"github.com/go-logr/logr/funcr"
	cadvisorapi "github.com/google/cadvisor/lib/model"
	v1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/klog/v2"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
	"k8s.io/kubernetes/pkg/kubelet/cm/containermap"
	"k8s.io/kubernetes/pkg/kubelet/cm/devicemanager"
	"k8s.io/kubernetes/pkg/kubelet/cm/topologymanager"
	"k8s.io/kubernetes/pkg/kubelet/lifecycle"
)

// newManagerImpl is the device manager's own constructor with the socket path as a parameter
// (its unit tests use it). The exported NewManagerImpl hard-codes
// /var/lib/kubelet/device-plugins/kubelet.sock; linking to the unexported one lets the harness
// run the unmodified manager on any directory without root or a private mount namespace.
//
//go:linkname newManagerImpl k8s.io/kubernetes/pkg/kubelet/cm/devicemanager.newManagerImpl
func newManagerImpl(logger klog.Logger, socketPath string, topology []cadvisorapi.Node,
	topologyAffinityStore topologymanager.Store) (*devicemanager.ManagerImpl, error)

// Log lines the manager emits (at V(4)) right before the optional RPCs; watching for them is the
// only way to observe from outside whether kubelet actually called the plugin. Pinned to the
// kubernetes version in go.mod.
const (
	msgPreferred = "Issuing a GetPreferredAllocation call for container"
	msgPreStart  = "Issuing a PreStartContainer call for container"
)

// noAffinity is a topology-manager store without a NUMA hint: the "none" policy, which is the
// kubelet default, so the device manager allocates without NUMA filtering.
type noAffinity struct{}

func (noAffinity) GetAffinity(klog.Logger, string, string) topologymanager.TopologyHint {
	return topologymanager.TopologyHint{}
}
func (noAffinity) GetPolicy() topologymanager.Policy { return topologymanager.NewNonePolicy() }
func (noAffinity) Name() string                      { return "none" }

// allSourcesReady tells the manager that the pod sources are synced, so it trusts activePods.
type allSourcesReady struct{}

func (allSourcesReady) AddSource(string) {}
func (allSourcesReady) AllReady() bool   { return true }

type options struct {
	dir          string
	resource     string
	expect       int
	allocatable  bool
	poll         time.Duration
	rpcRounds    int
	rpcCallers   int
	rpcSocket    string
	rpcSettled   string
	allocate     int
	timeout      time.Duration
	watchSeconds float64
	numaNodes    int
	verbosity    int
}

type deviceOut struct {
	ID        string `json:"id"`
	Health    string `json:"health"`
	NUMANodes []int  `json:"numa_nodes"`
}

type devSpecOut struct {
	HostPath      string `json:"host_path"`
	ContainerPath string `json:"container_path"`
	Permissions   string `json:"permissions"`
}

type mountOut struct {
	HostPath      string `json:"host_path"`
	ContainerPath string `json:"container_path"`
	ReadOnly      bool   `json:"read_only"`
}

type allocateOut struct {
	PodUID      string            `json:"pod_uid"`
	Container   string            `json:"container"`
	DeviceIDs   []string          `json:"device_ids"`
	Envs        map[string]string `json:"envs"`
	Devices     []devSpecOut      `json:"devices"`
	Mounts      []mountOut        `json:"mounts"`
	Annotations map[string]string `json:"annotations"`
	CDIDevices  []string          `json:"cdi_devices"`
}

type result struct {
	Resource        string                 `json:"resource"`
	Capacity        map[string]int64       `json:"capacity"`
	Allocatable     map[string]int64       `json:"allocatable"`
	Devices         map[string][]deviceOut `json:"devices"`
	Allocate        *allocateOut           `json:"allocate,omitempty"`
	PreferredCalled bool                   `json:"preferred_called"`
	PreStartCalled  bool                   `json:"prestart_called"`
	MetUnix         float64                `json:"met_unix,omitempty"`
	RPCRounds       *roundsOut             `json:"rpc_rounds,omitempty"`
	RPCSettled      *roundsOut             `json:"rpc_rounds_settled,omitempty"`
}

type watchLine struct {
	Elapsed     float64          `json:"elapsed"`
	Capacity    map[string]int64 `json:"capacity"`
	Allocatable map[string]int64 `json:"allocatable"`
}

func main() {
	var o options
	flag.StringVar(&o.dir, "dir", "", "device-plugin socket directory (required)")
	flag.StringVar(&o.resource, "resource", "", "extended resource name (required)")
	flag.IntVar(&o.expect, "expect", 1, "wait until capacity of --resource >= N (0: no wait)")
	flag.BoolVar(&o.allocatable, "allocatable", false, "wait on the allocatable count, not capacity")
	flag.DurationVar(&o.poll, "poll", 100*time.Millisecond, "how often counts are read while waiting")
	flag.IntVar(&o.rpcRounds, "rpc-rounds", 0, "Allocate calls straight to --rpc-socket (0: none)")
	flag.IntVar(&o.rpcCallers, "rpc-callers", 1, "concurrent callers for --rpc-rounds")
	flag.StringVar(&o.rpcSocket, "rpc-socket", "", "plugin socket for --rpc-rounds")
	flag.StringVar(&o.rpcSettled, "rpc-settled-file", "", "after --rpc-rounds, wait for this file and call again")
	flag.IntVar(&o.allocate, "allocate", 0, "allocate K devices to a fake pod (0: skip)")
	flag.DurationVar(&o.timeout, "timeout", 30*time.Second, "how long to wait for --expect")
	flag.Float64Var(&o.watchSeconds, "watch-seconds", 0, "print capacity changes for S seconds")
	flag.IntVar(&o.numaNodes, "numa-nodes", 1, "number of NUMA nodes of the fake machine")
	flag.IntVar(&o.verbosity, "v", 0, "kubelet log verbosity on stderr")
	flag.Parse()
	if o.dir == "" || o.resource == "" || flag.NArg() != 0 {
		fmt.Fprintln(os.Stderr, "kubelet-harness: --dir and --resource are required; see --help")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintf(os.Stderr, "kubelet-harness: %v\n", err)
		os.Exit(1)
	}
}

func run(o options) error {
	var preferredCalled, preStartCalled atomic.Bool
	// One logger for the manager and klog's global one (used by some manager goroutines): it
	// prints up to --v on stderr and records the optional-RPC messages at any level.
	logger := funcr.NewJSON(func(obj string) {
		var line struct {
			Msg string `json:"msg"`
			V   int    `json:"v"`
		}
		_ = json.Unmarshal([]byte(obj), &line)
		switch {
		case strings.HasPrefix(line.Msg, msgPreferred):
			preferredCalled.Store(true)
		case strings.HasPrefix(line.Msg, msgPreStart):
			preStartCalled.Store(true)
		}
		if line.V <= o.verbosity {
			fmt.Fprintln(os.Stderr, obj)
		}
	}, funcr.Options{Verbosity: 10, LogInfoLevel: ptr("v"), LogTimestamp: true})
	klog.SetLogger(logger)
	ctx, stop := signal.NotifyContext(klog.NewContext(context.Background(), logger),
		os.Interrupt, syscall.SIGTERM)
	defer stop()

	dir, err := filepath.Abs(o.dir)
	if err != nil {
		return err
	}
	topology := make([]cadvisorapi.Node, o.numaNodes)
	for i := range topology {
		topology[i].Id = i
	}
	manager, err := newManagerImpl(logger, filepath.Join(dir, filepath.Base(pluginapi.KubeletSocket)),
		topology, noAffinity{})
	if err != nil {
		return fmt.Errorf("creating device manager: %w", err)
	}

	pod := fakePod(o.resource, o.allocate)
	activePods := func() []*v1.Pod { return []*v1.Pod{pod} }
	if err := manager.Start(logger, activePods, allSourcesReady{}, containermap.NewContainerMap(),
		sets.New[string]()); err != nil {
		return fmt.Errorf("starting device manager: %w", err)
	}
	defer func() { _ = manager.Stop(logger) }()

	met, err := waitForCapacity(ctx, manager, logger, o)
	if err != nil {
		return err
	}

	res := result{Resource: o.resource, MetUnix: met}
	if o.allocate > 0 {
		out, err := allocate(ctx, manager, pod)
		if err != nil {
			return err
		}
		res.Allocate = out
	}
	res.Capacity, res.Allocatable = capacity(manager, logger)
	res.Devices = devices(manager, logger)
	if o.rpcRounds > 0 {
		ids := []string{}
		for _, d := range res.Devices[o.resource] {
			ids = append(ids, d.ID)
		}
		out, err := allocateRounds(ctx, o.rpcSocket, ids, o.rpcRounds, o.rpcCallers)
		if err != nil {
			return err
		}
		res.RPCRounds = out
		if o.rpcSettled != "" {
			if err := waitForFile(ctx, o.rpcSettled); err != nil {
				return err
			}
			out, err := allocateRounds(ctx, o.rpcSocket, ids, o.rpcRounds, o.rpcCallers)
			if err != nil {
				return err
			}
			res.RPCSettled = out
		}
	}
	res.PreferredCalled = preferredCalled.Load()
	res.PreStartCalled = preStartCalled.Load()
	if err := printJSON(res); err != nil {
		return err
	}
	if o.watchSeconds > 0 {
		return watch(ctx, manager, logger, time.Duration(o.watchSeconds*float64(time.Second)))
	}
	return nil
}

func ptr[T any](v T) *T { return &v }

// waitForFile returns once path exists (checked every 10 ms), or ctx's error.
func waitForFile(ctx context.Context, path string) error {
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("--rpc-settled-file %s: %w", path, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// fakePod is a pod with one container whose limits ask for k of the resource (device-plugin
// resources are limits-only: requests must equal limits).
func fakePod(resourceName string, k int) *v1.Pod {
	limits := v1.ResourceList{}
	if k > 0 {
		limits[v1.ResourceName(resourceName)] = *resource.NewQuantity(int64(k), resource.DecimalSI)
	}
	return &v1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "harness", Namespace: "default", UID: uuid.NewUUID()},
		Spec: v1.PodSpec{Containers: []v1.Container{{
			Name:      "harness",
			Resources: v1.ResourceRequirements{Limits: limits, Requests: limits},
		}}},
	}
}

func waitForCapacity(ctx context.Context, m *devicemanager.ManagerImpl, logger klog.Logger,
	o options) (float64, error) {
	if o.expect <= 0 {
		return 0, nil
	}
	what := "capacity"
	if o.allocatable {
		what = "allocatable"
	}
	deadline := time.After(o.timeout)
	poll := o.poll
	if poll <= 0 {
		poll = 100 * time.Millisecond
	}
	tick := time.NewTicker(poll)
	defer tick.Stop()
	for {
		capa, alloc := capacity(m, logger)
		count := capa[o.resource]
		if o.allocatable {
			count = alloc[o.resource]
		}
		if count >= int64(o.expect) {
			return float64(time.Now().UnixNano()) / 1e9, nil
		}
		select {
		case <-ctx.Done():
			return 0, errors.New("interrupted while waiting for capacity")
		case <-deadline:
			return 0, fmt.Errorf("timeout after %s: %s of %q is %d, expected >= %d "+
				"(did a plugin register at %s?)", o.timeout, what, o.resource, count,
				o.expect, filepath.Join(o.dir, filepath.Base(pluginapi.KubeletSocket)))
		case <-tick.C:
		}
	}
}

// allocate does what kubelet does when admitting and then starting the container: Allocate
// (device choice, GetPreferredAllocation, Allocate RPC, checkpoint) then
// GetDeviceRunContainerOptions (PreStartContainer, the options given to the runtime).
func allocate(ctx context.Context, m *devicemanager.ManagerImpl, pod *v1.Pod) (*allocateOut,
	error) {
	container := &pod.Spec.Containers[0]
	if err := m.Allocate(ctx, pod, container, lifecycle.AddOperation); err != nil {
		return nil, fmt.Errorf("allocate: %w", err)
	}
	opts, err := m.GetDeviceRunContainerOptions(ctx, pod, container)
	if err != nil {
		return nil, fmt.Errorf("run container options: %w", err)
	}
	out := &allocateOut{
		PodUID:      string(pod.UID),
		Container:   container.Name,
		DeviceIDs:   []string{},
		Envs:        map[string]string{},
		Devices:     []devSpecOut{},
		Mounts:      []mountOut{},
		Annotations: map[string]string{},
		CDIDevices:  []string{},
	}
	for _, ids := range m.GetDevices(string(pod.UID), container.Name) {
		for id := range ids {
			out.DeviceIDs = append(out.DeviceIDs, id)
		}
	}
	sort.Strings(out.DeviceIDs)
	if opts == nil {
		return out, nil
	}
	for _, e := range opts.Envs {
		out.Envs[e.Name] = e.Value
	}
	for _, d := range opts.Devices {
		out.Devices = append(out.Devices, devSpecOut{d.PathOnHost, d.PathInContainer, d.Permissions})
	}
	for _, mnt := range opts.Mounts {
		out.Mounts = append(out.Mounts, mountOut{mnt.HostPath, mnt.ContainerPath, mnt.ReadOnly})
	}
	for _, a := range opts.Annotations {
		out.Annotations[a.Name] = a.Value
	}
	for _, c := range opts.CDIDevices {
		out.CDIDevices = append(out.CDIDevices, c.Name)
	}
	return out, nil
}

func capacity(m *devicemanager.ManagerImpl, logger klog.Logger) (map[string]int64,
	map[string]int64) {
	capa, alloc, _ := m.GetCapacity(logger)
	return quantities(capa), quantities(alloc)
}

func quantities(list v1.ResourceList) map[string]int64 {
	out := map[string]int64{}
	for name, q := range list {
		out[string(name)] = q.Value()
	}
	return out
}

// devices lists the healthy (allocatable) devices the manager knows, with their NUMA nodes.
func devices(m *devicemanager.ManagerImpl, logger klog.Logger) map[string][]deviceOut {
	out := map[string][]deviceOut{}
	for name, instances := range m.GetAllocatableDevices(logger) {
		list := []deviceOut{}
		for id, dev := range instances {
			d := deviceOut{ID: id, Health: dev.GetHealth(), NUMANodes: []int{}}
			for _, n := range dev.GetTopology().GetNodes() {
				d.NUMANodes = append(d.NUMANodes, int(n.GetID()))
			}
			list = append(list, d)
		}
		sort.Slice(list, func(i, j int) bool { return list[i].ID < list[j].ID })
		out[name] = list
	}
	return out
}

func watch(ctx context.Context, m *devicemanager.ManagerImpl, logger klog.Logger,
	d time.Duration) error {
	start := time.Now()
	deadline := time.After(d)
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	var lastCap, lastAlloc map[string]int64
	for {
		capa, alloc := capacity(m, logger)
		if lastCap == nil || !maps.Equal(capa, lastCap) || !maps.Equal(alloc, lastAlloc) {
			line := watchLine{time.Since(start).Seconds(), capa, alloc}
			if err := printJSON(line); err != nil {
				return err
			}
			lastCap, lastAlloc = capa, alloc
		}
		select {
		case <-ctx.Done():
			return nil
		case <-deadline:
			return nil
		case <-tick.C:
		}
	}
}

func printJSON(v any) error {
	b, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(os.Stdout, string(b))
	return err
}
