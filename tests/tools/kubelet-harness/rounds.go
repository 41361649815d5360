package main

import (
	"context"
	"fmt"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	pluginapi "k8s.io/kubelet/pkg/apis/deviceplugin/v1beta1"
)

// roundsOut is the --rpc-rounds result: Allocate round trips as the kubelet's own gRPC client
// (grpc-go) makes them, one device per call, measured by the caller.
type roundsOut struct {
	Calls   int     `json:"calls"`
	Callers int     `json:"callers"`
	P50Ms   float64 `json:"p50_ms"`
	P99Ms   float64 `json:"p99_ms"`
	MaxMs   float64 `json:"max_ms"`
	MeanMs  float64 `json:"mean_ms"`
	Errors  int     `json:"errors"`
}

// allocateRounds dials the plugin socket and makes n Allocate calls split over callers
// goroutines (each call asks for one of ids, in turn), after 20 warm-up calls.
func allocateRounds(ctx context.Context, socket string, ids []string, n, callers int) (*roundsOut,
	error) {
	if len(ids) == 0 {
		return nil, fmt.Errorf("--rpc-rounds: no allocatable devices to ask for")
	}
	if callers < 1 {
		callers = 1
	}
	abs, err := filepath.Abs(socket)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient("unix://"+abs, grpc.WithAuthority("localhost"), // as the kubelet dials
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, fmt.Errorf("dial %s: %w", socket, err)
	}
	defer conn.Close()
	client := pluginapi.NewDevicePluginClient(conn)
	call := func(id string) (time.Duration, error) {
		req := &pluginapi.AllocateRequest{ContainerRequests: []*pluginapi.ContainerAllocateRequest{
			{DevicesIds: []string{id}}}}
		// No per-call deadline, as the kubelet calls it (endpoint.allocate gets the pod
		// admission's context): a deadline would add a grpc-timeout header whose value
		// changes every call, which the kubelet never sends.
		start := time.Now()
		_, err := client.Allocate(ctx, req)
		return time.Since(start), err
	}
	for i := 0; i < 20; i++ {
		if _, err := call(ids[i%len(ids)]); err != nil {
			return nil, fmt.Errorf("warm-up Allocate: %w", err)
		}
	}
	lat := make([]time.Duration, 0, n)
	var mu sync.Mutex
	var wg sync.WaitGroup
	errs := 0
	per := n / callers
	for c := 0; c < callers; c++ {
		wg.Add(1)
		go func(c int) {
			defer wg.Done()
			for i := 0; i < per; i++ {
				d, err := call(ids[(c*per+i)%len(ids)])
				mu.Lock()
				if err != nil {
					errs++
				} else {
					lat = append(lat, d)
				}
				mu.Unlock()
			}
		}(c)
	}
	wg.Wait()
	if len(lat) == 0 {
		return nil, fmt.Errorf("every Allocate call failed")
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	var sum time.Duration
	for _, d := range lat {
		sum += d
	}
	pct := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat)-1)+0.5))] }
	return &roundsOut{len(lat), callers, ms(pct(0.5)), ms(pct(0.99)), ms(lat[len(lat)-1]),
		ms(sum / time.Duration(len(lat))), errs}, nil
}
