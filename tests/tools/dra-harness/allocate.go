package main

// dra-harness allocate --kubeconfig F --namespace NS --claim NAME --node NODE
//                      [--reserve-for-pod POD] [--timeout 30s] [--v N]
//
// What kube-scheduler's DynamicResources plugin does for one claim on one node: the structured
// allocator (k8s.io/dynamic-resource-allocation/structured) over every ResourceSlice, every
// DeviceClass and the devices already allocated to other claims, with the allocator features
// the scheduler derives from the default feature gates; then PreBind's write: the
// delete-protection finalizer (plain update), status.allocation (+ reservedFor the pod) with
// UpdateStatus.

import (
	"context"
	"fmt"
	"slices"
	"time"

	v1 "k8s.io/api/core/v1"
	resourceapi "k8s.io/api/resource/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/sets"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	"k8s.io/client-go/kubernetes"
	"k8s.io/dynamic-resource-allocation/cel"
	"k8s.io/dynamic-resource-allocation/structured"
	"k8s.io/klog/v2"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/dynamicresources"
	"k8s.io/kubernetes/pkg/scheduler/framework/plugins/feature"
)

type allocatedDevice struct {
	Request string `json:"request"`
	Driver  string `json:"driver"`
	Pool    string `json:"pool"`
	Device  string `json:"device"`
}

type allocateOut struct {
	Claim       string                                       `json:"claim"`
	Node        string                                       `json:"node"`
	Allocated   bool                                         `json:"allocated"`
	Reason      string                                       `json:"reason,omitempty"`
	Allocation  *resourceapi.AllocationResult                `json:"allocation,omitempty"`
	Devices     []allocatedDevice                            `json:"devices,omitempty"`
	ReservedFor []resourceapi.ResourceClaimConsumerReference `json:"reservedFor,omitempty"`
}

// classLister serves the DeviceClasses listed once per attempt.
type classLister map[string]*resourceapi.DeviceClass

func (l classLister) List() ([]*resourceapi.DeviceClass, error) {
	out := make([]*resourceapi.DeviceClass, 0, len(l))
	for _, c := range l {
		out = append(out, c)
	}
	return out, nil
}

func (l classLister) Get(name string) (*resourceapi.DeviceClass, error) {
	if c, ok := l[name]; ok {
		return c, nil
	}
	return nil, apierrors.NewNotFound(resourceapi.Resource("deviceclasses"), name)
}

func runAllocate(args []string) error {
	fs := newFlags("allocate")
	kubeconfig := fs.String("kubeconfig", "", "kubeconfig of the API server (required)")
	namespace := fs.String("namespace", "default", "namespace of the claim (and pod)")
	claimName := fs.String("claim", "", "ResourceClaim to allocate (required)")
	nodeName := fs.String("node", "", "node to allocate on; the Node object must exist (required)")
	podName := fs.String("reserve-for-pod", "", "also reserve the claim for this pod")
	timeout := fs.Duration("timeout", 30*time.Second, "retry until the claim fits or this passes")
	verbosity := fs.Int("v", 0, "log verbosity on stderr")
	if err := parse(fs, args); err != nil {
		return err
	}
	if err := required(map[string]string{"kubeconfig": *kubeconfig, "claim": *claimName,
		"node": *nodeName}); err != nil {
		return err
	}
	logger := stderrLogger(*verbosity)
	ctx := klog.NewContext(context.Background(), logger)
	client, err := clientFor(*kubeconfig)
	if err != nil {
		return err
	}
	out := allocateOut{Claim: *namespace + "/" + *claimName, Node: *nodeName}

	node, err := client.CoreV1().Nodes().Get(ctx, *nodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("node %s: %w", *nodeName, err)
	}
	var pod *v1.Pod
	if *podName != "" {
		if pod, err = client.CoreV1().Pods(*namespace).Get(ctx, *podName, metav1.GetOptions{}); err != nil {
			return fmt.Errorf("pod %s/%s: %w", *namespace, *podName, err)
		}
	}

	fts := feature.NewSchedulerFeaturesFromGates(utilfeature.DefaultFeatureGate)
	celCache := cel.NewCache(10, cel.Features{
		EnableConsumableCapacity: fts.EnableDRAConsumableCapacity,
		EnableListTypeAttributes: fts.EnableDRAListTypeAttributes,
	})
	deadline := time.Now().Add(*timeout)
	var claim *resourceapi.ResourceClaim
	var result *resourceapi.AllocationResult
	var why string
	for {
		claim, result, why, err = allocateOnce(ctx, client, fts, celCache, *namespace, *claimName, node)
		if err != nil {
			return err
		}
		if result != nil {
			break
		}
		if time.Now().After(deadline) {
			out.Reason = "no fitting devices on node " + node.Name + " (structured allocator)"
			if why != "" {
				out.Reason = why
			}
			if err := printJSON(out); err != nil {
				return err
			}
			return errNoFit
		}
		time.Sleep(200 * time.Millisecond)
	}

	claim, err = bindClaim(ctx, client, claim, result, pod)
	if err != nil {
		return err
	}
	out.Allocated = true
	out.Allocation = claim.Status.Allocation
	out.ReservedFor = claim.Status.ReservedFor
	for _, r := range claim.Status.Allocation.Devices.Results {
		out.Devices = append(out.Devices, allocatedDevice{r.Request, r.Driver, r.Pool, r.Device})
	}
	return printJSON(out)
}

// allocateOnce reads the current state and runs the allocator: a nil result when nothing fits
// yet, with the allocator's error text if it gave one (e.g. a failing CEL selector); an error
// for what retrying cannot fix (claim, class or API errors).
func allocateOnce(ctx context.Context, client kubernetes.Interface, fts feature.Features,
	celCache *cel.Cache, namespace, name string, node *v1.Node,
) (*resourceapi.ResourceClaim, *resourceapi.AllocationResult, string, error) {
	res := client.ResourceV1()
	claim, err := res.ResourceClaims(namespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, nil, "", fmt.Errorf("claim %s/%s: %w", namespace, name, err)
	}
	if claim.Status.Allocation != nil {
		return nil, nil, "", fmt.Errorf("claim %s/%s is already allocated", namespace, name)
	}
	classes, err := res.DeviceClasses().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, "", fmt.Errorf("listing DeviceClasses: %w", err)
	}
	lister := classLister{}
	for i := range classes.Items {
		lister[classes.Items[i].Name] = &classes.Items[i]
	}
	for _, r := range claim.Spec.Devices.Requests {
		for _, cls := range requestClasses(r) {
			if _, ok := lister[cls]; !ok {
				return nil, nil, "", fmt.Errorf("claim %s/%s request %q: DeviceClass %q does not exist",
					namespace, name, r.Name, cls)
			}
		}
	}
	sliceList, err := res.ResourceSlices().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, "", fmt.Errorf("listing ResourceSlices: %w", err)
	}
	slices := make([]*resourceapi.ResourceSlice, len(sliceList.Items))
	for i := range sliceList.Items {
		slices[i] = &sliceList.Items[i]
	}
	claims, err := res.ResourceClaims("").List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, nil, "", fmt.Errorf("listing ResourceClaims: %w", err)
	}
	state := allocatedState(claims.Items, fts.EnableDRAConsumableCapacity)

	allocator, err := structured.NewAllocator(ctx, dynamicresources.AllocatorFeatures(fts), state,
		lister, slices, celCache)
	if err != nil {
		return nil, nil, "", fmt.Errorf("creating the allocator: %w", err)
	}
	results, err := allocator.Allocate(ctx, node, []*resourceapi.ResourceClaim{claim})
	if err != nil {
		klog.FromContext(ctx).V(2).Info("Allocation failed, will retry", "claim",
			klog.KObj(claim), "err", err)
		return claim, nil, err.Error(), nil
	}
	if len(results) == 0 {
		return claim, nil, "", nil
	}
	return claim, &results[0], "", nil
}

func requestClasses(r resourceapi.DeviceRequest) []string {
	if r.Exactly != nil {
		return []string{r.Exactly.DeviceClassName}
	}
	out := make([]string, 0, len(r.FirstAvailable))
	for _, s := range r.FirstAvailable {
		out = append(out, s.DeviceClassName)
	}
	return out
}

// allocatedState is the scheduler's view of devices in use (allocateddevices.go: dedicated
// devices; shared ones and their consumed capacity when consumable capacity is on; admin
// access does not count).
func allocatedState(claims []resourceapi.ResourceClaim, consumable bool) structured.AllocatedState {
	state := structured.AllocatedState{
		AllocatedDevices:         sets.New[structured.DeviceID](),
		AllocatedSharedDeviceIDs: sets.New[structured.SharedDeviceID](),
		AggregatedCapacity:       structured.NewConsumedCapacityCollection(),
	}
	for i := range claims {
		alloc := claims[i].Status.Allocation
		if alloc == nil {
			continue
		}
		for _, r := range alloc.Devices.Results {
			if r.AdminAccess != nil && *r.AdminAccess {
				continue
			}
			id := structured.MakeDeviceID(r.Driver, r.Pool, r.Device)
			if consumable && r.ShareID != nil {
				state.AllocatedSharedDeviceIDs.Insert(structured.MakeSharedDeviceID(id, r.ShareID))
				if r.ConsumedCapacity != nil {
					state.AggregatedCapacity.Insert(
						structured.NewDeviceConsumedCapacity(id, r.ConsumedCapacity))
				}
				continue
			}
			state.AllocatedDevices.Insert(id)
		}
	}
	return state
}

// bindClaim writes the allocation as the scheduler's PreBind does: finalizer first (a normal
// update), then allocation and reservation in the status.
func bindClaim(ctx context.Context, client kubernetes.Interface, claim *resourceapi.ResourceClaim,
	result *resourceapi.AllocationResult, pod *v1.Pod,
) (*resourceapi.ResourceClaim, error) {
	claims := client.ResourceV1().ResourceClaims(claim.Namespace)
	claim = claim.DeepCopy()
	if !slices.Contains(claim.Finalizers, resourceapi.Finalizer) {
		claim.Finalizers = append(claim.Finalizers, resourceapi.Finalizer)
		updated, err := claims.Update(ctx, claim, metav1.UpdateOptions{})
		if err != nil {
			return nil, fmt.Errorf("add finalizer to claim %s: %w", klog.KObj(claim), err)
		}
		claim = updated
	}
	claim.Status.Allocation = result
	if pod != nil {
		claim.Status.ReservedFor = append(claim.Status.ReservedFor,
			resourceapi.ResourceClaimConsumerReference{
				APIGroup: v1.GroupName, Resource: "pods", Name: pod.Name, UID: pod.UID,
			})
	}
	updated, err := claims.UpdateStatus(ctx, claim, metav1.UpdateOptions{})
	if err != nil {
		return nil, fmt.Errorf("add allocation to claim %s: %w", klog.KObj(claim), err)
	}
	return updated, nil
}
