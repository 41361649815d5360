package main

// dra-harness kubelet --kubeconfig F --node NODE --registry-dir DIR --state-dir DIR
//                     [--namespace NS] [--feature-gates K=V,...] [--v N]
//
// The kubelet's own DRA manager (k8s.io/kubernetes/pkg/kubelet/cm/dra) with the kubelet's
// plugin manager watching --registry-dir (plugin registration, pluginregistration/v1, handler
// type DRAPlugin), unmodified. Stdin takes commands, one per line: "prepare POD",
// "unprepare POD", "status POD", "quit" (EOF = quit). Stdout gets JSON lines with "event":
// ready, registered, deregistered, prepared, unprepared, status, health, error.

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	v1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/record"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
	"k8s.io/kubernetes/pkg/kubelet/cm/dra"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager"
	"k8s.io/kubernetes/pkg/kubelet/pluginmanager/cache"
)

type kubeletEvent struct {
	Event      string         `json:"event"`
	Driver     string         `json:"driver,omitempty"`
	Endpoint   string         `json:"endpoint,omitempty"`
	Services   []string       `json:"services,omitempty"`
	Pod        string         `json:"pod,omitempty"`
	Containers map[string]any `json:"containers,omitempty"`
	Command    string         `json:"command,omitempty"`
	Message    string         `json:"message,omitempty"`
}

// eventPrinter serialises the output lines of the command loop, the health loop and the
// registration handler.
type eventPrinter struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *eventPrinter) print(e kubeletEvent) {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, err := json.Marshal(e)
	if err == nil {
		_, err = fmt.Fprintln(p.w, string(b))
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s kubelet: writing output: %v\n", harnessName, err)
	}
}

// reportingHandler passes every call on to the DRA manager's handler and reports the outcome.
type reportingHandler struct {
	inner cache.PluginHandler
	out   *eventPrinter
}

func (h reportingHandler) ValidatePlugin(ctx context.Context, name, endpoint string,
	versions []string,
) error {
	err := h.inner.ValidatePlugin(ctx, name, endpoint, versions)
	if err != nil {
		h.out.print(kubeletEvent{Event: "error", Command: "register " + name, Driver: name,
			Endpoint: endpoint, Services: versions, Message: err.Error()})
	}
	return err
}

func (h reportingHandler) RegisterPlugin(ctx context.Context, name, endpoint string,
	versions []string, timeout *time.Duration,
) error {
	err := h.inner.RegisterPlugin(ctx, name, endpoint, versions, timeout)
	if err != nil {
		h.out.print(kubeletEvent{Event: "error", Command: "register " + name, Driver: name,
			Endpoint: endpoint, Services: versions, Message: err.Error()})
		return err
	}
	h.out.print(kubeletEvent{Event: "registered", Driver: name, Endpoint: endpoint,
		Services: versions})
	return nil
}

func (h reportingHandler) DeRegisterPlugin(ctx context.Context, name, endpoint string) {
	h.inner.DeRegisterPlugin(ctx, name, endpoint)
	h.out.print(kubeletEvent{Event: "deregistered", Driver: name, Endpoint: endpoint})
}

type allReady struct{}

func (allReady) AddSource(string) {}
func (allReady) AllReady() bool   { return true }

// podSet holds the pods the harness prepared: the manager's active pods (its reconcile loop
// unprepares claims of pods that are not active) and the pods health updates are shown for.
type podSet struct {
	mu   sync.Mutex
	pods map[types.UID]*v1.Pod
}

func (s *podSet) active() []*v1.Pod {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*v1.Pod, 0, len(s.pods))
	for _, p := range s.pods {
		out = append(out, p)
	}
	return out
}

func (s *podSet) put(p *v1.Pod) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.pods[p.UID] = p
}

func (s *podSet) drop(uid types.UID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.pods, uid)
}

func (s *podSet) get(uid types.UID) *v1.Pod {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.pods[uid]
}

type kubeletHarness struct {
	client    kubernetes.Interface
	manager   *dra.Manager
	namespace string
	pods      podSet
	out       *eventPrinter
	logger    klog.Logger
}

func runKubelet(args []string) error {
	fs := newFlags("kubelet")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the API server (required)")
	nodeName := fs.String("node", "", "the node this kubelet is; the Node object should exist (required)")
	registryDir := fs.String("registry-dir", "", "plugin registration directory to watch (required)")
	stateDir := fs.String("state-dir", "", "the DRA manager's checkpoint directory (required)")
	namespace := fs.String("namespace", "default", "namespace of the pods named on stdin")
	gates := fs.String("feature-gates", "", "kubelet feature gates, K=V,... (default: 1.37's)")
	verbosity := fs.Int("v", 0, "kubelet log verbosity on stderr")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(map[string]string{"kubeconfig": *kubeconfig, "node": *nodeName,
		"registry-dir": *registryDir, "state-dir": *stateDir}); err != nil {
		return err
	}
	if *gates != "" {
		if err := utilfeature.DefaultMutableFeatureGate.Set(*gates); err != nil {
			return usageError{"--feature-gates: " + err.Error()}
		}
	}
	logger := stderrLogger(*verbosity)
	client, err := clientFor(*kubeconfig)
	if err != nil {
		return err
	}
	return serveKubelet(klog.NewContext(context.Background(), logger), client, kubeletOptions{
		node: *nodeName, registryDir: *registryDir, stateDir: *stateDir, namespace: *namespace,
	}, os.Stdin, os.Stdout)
}

type kubeletOptions struct {
	node, registryDir, stateDir, namespace string
}

// serveKubelet runs the DRA manager and plugin watcher until "quit" or EOF on in.
func serveKubelet(ctx context.Context, client kubernetes.Interface, o kubeletOptions,
	in io.Reader, out io.Writer,
) error {
	logger := klog.FromContext(ctx)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	for _, d := range []string{o.registryDir, o.stateDir} {
		if err := os.MkdirAll(d, 0o750); err != nil {
			return err
		}
	}
	regDir, err := filepath.Abs(o.registryDir)
	if err != nil {
		return err
	}

	h := &kubeletHarness{client: client, namespace: o.namespace, out: &eventPrinter{w: out},
		logger: logger, pods: podSet{pods: map[types.UID]*v1.Pod{}}}
	h.manager, err = dra.NewManager(logger, client, o.stateDir)
	if err != nil {
		return fmt.Errorf("creating the DRA manager: %w", err)
	}
	getNode := func(ctx context.Context) (*v1.Node, error) {
		return client.CoreV1().Nodes().Get(ctx, o.node, metav1.GetOptions{})
	}
	if err := h.manager.Start(ctx, h.pods.active, getNode, allReady{}); err != nil {
		return fmt.Errorf("starting the DRA manager: %w", err)
	}
	defer h.manager.Stop()

	plugins := pluginmanager.NewPluginManager(regDir, &record.FakeRecorder{})
	plugins.AddHandler(registerapi.DRAPlugin,
		reportingHandler{inner: h.manager.GetWatcherHandler(), out: h.out})
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); plugins.Run(ctx, allReady{}, stop) }()
	go func() { defer wg.Done(); h.healthLoop(ctx) }()
	defer func() { close(stop); cancel(); wg.Wait() }()

	h.out.print(kubeletEvent{Event: "ready"})
	return h.commandLoop(ctx, in)
}

func (h *kubeletHarness) commandLoop(ctx context.Context, in io.Reader) error {
	scanner := bufio.NewScanner(in)
	for scanner.Scan() {
		line := strings.TrimSpace(scanner.Text())
		if line == "" {
			continue
		}
		words := strings.Fields(line)
		if words[0] == "quit" {
			return nil
		}
		if len(words) != 2 {
			h.out.print(kubeletEvent{Event: "error", Command: line,
				Message: "expected: prepare POD | unprepare POD | status POD | quit"})
			continue
		}
		if err := h.command(ctx, words[0], words[1]); err != nil {
			h.out.print(kubeletEvent{Event: "error", Command: line, Message: err.Error()})
		}
	}
	return scanner.Err()
}

func (h *kubeletHarness) command(ctx context.Context, verb, name string) error {
	pod, err := h.client.CoreV1().Pods(h.namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return err
	}
	ref := h.namespace + "/" + name
	switch verb {
	case "prepare":
		// Active before preparing, so the reconcile loop never unprepares it half-way.
		h.pods.put(pod)
		if err := h.manager.PrepareResources(ctx, pod); err != nil {
			h.pods.drop(pod.UID)
			return err
		}
		containers := map[string]any{}
		for i := range pod.Spec.Containers {
			c := &pod.Spec.Containers[i]
			info, err := h.manager.GetResources(pod, c)
			if err != nil {
				return err
			}
			ids := []string{}
			for _, d := range info.CDIDevices {
				ids = append(ids, d.Name)
			}
			containers[c.Name] = ids
		}
		h.out.print(kubeletEvent{Event: "prepared", Pod: ref, Containers: containers})
	case "unprepare":
		if err := h.manager.UnprepareResources(ctx, pod); err != nil {
			return err
		}
		h.pods.drop(pod.UID)
		h.out.print(kubeletEvent{Event: "unprepared", Pod: ref})
	case "status":
		h.out.print(h.resourceStatus("status", pod))
	default:
		return fmt.Errorf("unknown command %q", verb)
	}
	return nil
}

// resourceStatus is what the kubelet puts into each container's allocatedResourcesStatus.
func (h *kubeletHarness) resourceStatus(event string, pod *v1.Pod) kubeletEvent {
	status := v1.PodStatus{}
	for _, c := range pod.Spec.Containers {
		status.ContainerStatuses = append(status.ContainerStatuses, v1.ContainerStatus{Name: c.Name})
	}
	h.manager.UpdateAllocatedResourcesStatus(h.logger, pod, &status)
	containers := map[string]any{}
	for _, cs := range status.ContainerStatuses {
		rs := cs.AllocatedResourcesStatus
		if rs == nil {
			rs = []v1.ResourceStatus{}
		}
		sort.Slice(rs, func(i, j int) bool { return rs[i].Name < rs[j].Name })
		containers[cs.Name] = rs
	}
	return kubeletEvent{Event: event, Pod: pod.Namespace + "/" + pod.Name, Containers: containers}
}

// healthLoop turns the manager's health updates (from the drivers' dra-health streams) into
// "health" lines for the prepared pods they name, as the kubelet's status manager would.
func (h *kubeletHarness) healthLoop(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case u := <-h.manager.Updates():
			for _, uid := range u.PodUIDs {
				if pod := h.pods.get(types.UID(uid)); pod != nil {
					h.out.print(h.resourceStatus("health", pod))
				}
			}
		}
	}
}
