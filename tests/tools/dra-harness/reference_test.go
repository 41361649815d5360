package main

// Reference output of the upstream Go DRA helper's device-metadata writer
// (k8s.io/dynamic-resource-allocation/kubeletplugin, what EnableDeviceMetadata runs at
// NodePrepareResources), checked byte for byte against tests/data/dra/ and read back by every
// consumer the harness offers: upstream devicemetadata, KubeVirt v1.9.0's own reader (pkg/dra)
// and the CDI library. hostdev's Python driver must write the same bytes.
//
// Regenerate after a dependency bump: go test ./dra-harness/ -run TestReference -update

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	_ "unsafe" // for go:linkname

	resourceapi "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	"k8s.io/dynamic-resource-allocation/kubeletplugin"
	"k8s.io/utils/ptr"
	kvv1 "kubevirt.io/api/core/v1"
	"tags.cncf.io/container-device-interface/pkg/cdi"

	drautil "kubevirt.io/kubevirt/pkg/dra"
)

var update = flag.Bool("update", false, "rewrite tests/data/dra/ from the upstream writer")

// metadataWriter is the upstream writer's unexported type, only ever used by pointer here.
type metadataWriter struct{}

// The upstream writer is unexported; its public entry point needs a whole running kubelet
// plugin. Linking to it directly runs exactly the code EnableDeviceMetadata runs.
//
//go:linkname newMetadataWriter k8s.io/dynamic-resource-allocation/kubeletplugin.newMetadataWriter
func newMetadataWriter(driverName, pluginDataDir, cdiDir string, versions []schema.GroupVersion,
	fileOps kubeletplugin.MetadataFileOperations) (*metadataWriter, error)

//go:linkname processPreparedClaim k8s.io/dynamic-resource-allocation/kubeletplugin.(*metadataWriter).processPreparedClaim
func processPreparedClaim(w *metadataWriter, claim *resourceapi.ResourceClaim,
	devices []kubeletplugin.Device) (map[string]string, error)

const (
	refDriver        = "pci.hostdev.io"
	refPluginDataDir = "/var/lib/kubelet/plugins/pci.hostdev.io"
	refCDIDir        = "/var/run/cdi"
	refPCIBusID      = "0000:17:00.0"
)

var (
	v1alpha1 = schema.GroupVersion{Group: metadata.GroupName, Version: "v1alpha1"}
	v1beta1  = schema.GroupVersion{Group: metadata.GroupName, Version: "v1beta1"}
)

// rooted writes the writer's absolute paths under root, so the files keep the node's paths.
func rooted(root string) kubeletplugin.MetadataFileOperations {
	at := func(p string) string { return filepath.Join(root, p) }
	return kubeletplugin.MetadataFileOperations{
		WriteFile: func(n string, d []byte, m os.FileMode) error { return os.WriteFile(at(n), d, m) },
		ReadFile:  func(n string) ([]byte, error) { return os.ReadFile(at(n)) },
		MkdirAll:  func(p string, m os.FileMode) error { return os.MkdirAll(at(p), m) },
		RemoveAll: func(p string) error { return os.RemoveAll(at(p)) },
		Remove:    func(p string) error { return os.Remove(at(p)) },
		Glob: func(p string) ([]string, error) {
			m, err := filepath.Glob(at(p))
			for i := range m {
				m[i] = strings.TrimPrefix(m[i], root)
			}
			return m, err
		},
	}
}

type refCase struct {
	name         string // directory under tests/data/dra/
	versions     []schema.GroupVersion
	podClaimName string // set: the claim was made from a template
}

var refCases = []refCase{
	{"claim", []schema.GroupVersion{v1beta1, v1alpha1}, ""},
	{"template", []schema.GroupVersion{v1beta1, v1alpha1}, "gpu"},
	{"v1beta1-only", []schema.GroupVersion{v1beta1}, ""},
}

func refClaim(c refCase) *resourceapi.ResourceClaim {
	claim := &resourceapi.ResourceClaim{ObjectMeta: metav1.ObjectMeta{
		Namespace: "vms", Name: "vm1-gpu-x7k2p", UID: types.UID("3f0c2a4e-9d1b-4c55-8e1a-2b7d6c9e0f11"),
	}}
	if c.podClaimName != "" {
		claim.Annotations = map[string]string{resourceapi.PodResourceClaimAnnotation: c.podClaimName}
	} else {
		claim.Name = "gpu-claim"
	}
	return claim
}

func refDevices() []kubeletplugin.Device {
	return []kubeletplugin.Device{{
		Requests:   []string{"gpu"},
		PoolName:   "node-1",
		DeviceName: "pci-0000-17-00-0",
		Metadata: &kubeletplugin.DeviceMetadata{Attributes: map[string]resourceapi.DeviceAttribute{
			"resource.kubernetes.io/pciBusID": {StringValue: ptr.To(refPCIBusID)},
			"resource.kubernetes.io/pcieRoot": {StringValue: ptr.To("pci0000:00")},
			"pci.hostdev.io/iommuGroup":       {IntValue: ptr.To[int64](40)},
		}},
	}}
}

// writeReference runs the upstream writer for c under root; returns the CDI device ID it made.
func writeReference(t *testing.T, c refCase, root string) string {
	t.Helper()
	w, err := newMetadataWriter(refDriver, refPluginDataDir, refCDIDir, c.versions, rooted(root))
	if err != nil {
		t.Fatal(err)
	}
	ids, err := processPreparedClaim(w, refClaim(c), refDevices())
	if err != nil {
		t.Fatal(err)
	}
	if len(ids) != 1 || ids["gpu"] == "" {
		t.Fatalf("CDI IDs %v, want one for request gpu", ids)
	}
	return ids["gpu"]
}

func listFiles(t *testing.T, root string) map[string][]byte {
	t.Helper()
	files := map[string][]byte{}
	err := filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() == "cdi-id" {
			return err
		}
		b, err := os.ReadFile(p)
		files[strings.TrimPrefix(p, root)] = b
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return files
}

func TestReference(t *testing.T) {
	for _, c := range refCases {
		t.Run(c.name, func(t *testing.T) {
			root := t.TempDir()
			cdiID := writeReference(t, c, root)
			golden := filepath.Join("..", "..", "data", "dra", c.name)
			if *update {
				if err := os.RemoveAll(golden); err != nil {
					t.Fatal(err)
				}
				if err := os.CopyFS(golden, os.DirFS(root)); err != nil {
					t.Fatal(err)
				}
				if err := os.WriteFile(filepath.Join(golden, "cdi-id"), []byte(cdiID+"\n"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			got, want := listFiles(t, root), listFiles(t, golden)
			if len(got) != len(want) {
				t.Fatalf("upstream wrote %d files, %s has %d: run with -update", len(got), golden, len(want))
			}
			for name, b := range got {
				if !bytes.Equal(b, want[name]) {
					t.Errorf("%s differs from the upstream writer's output:\n%s\nwant:\n%s", name, want[name], b)
				}
			}
			checkConsumers(t, c, root, cdiID)
		})
	}
}

// checkConsumers reads the written files back with every consumer the harness wraps.
func checkConsumers(t *testing.T, c refCase, root, cdiID string) {
	claim := refClaim(c)
	hostFile := filepath.Join(root, refPluginDataDir, "dra-device-metadata",
		claim.Namespace+"_"+claim.Name, "gpu", "metadata.json")

	// Upstream devicemetadata (dra-harness metadata).
	md, err := decodeMetadataFile(hostFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(md.Devices) != 1 || md.Devices[0].PCIBusID != refPCIBusID || md.DecodedFrom != v1beta1.String() {
		t.Errorf("devicemetadata read %+v from %s", md.Devices, md.DecodedFrom)
	}

	// The CDI library (dra-harness cdi): the spec bind-mounts the file at KubeVirt's path.
	cache, err := cdi.NewCache(cdi.WithSpecDirs(filepath.Join(root, refCDIDir)), cdi.WithAutoRefresh(false))
	if err != nil {
		t.Fatal(err)
	}
	dev := cache.GetDevice(cdiID)
	if dev == nil {
		t.Fatalf("CDI device %s not found; spec errors %v", cdiID, cache.GetErrors())
	}
	mounts := dev.ContainerEdits.Mounts
	wantPath := metadata.ResourceClaimFilePath(refDriver, claim.Name, "gpu")
	if c.podClaimName != "" {
		wantPath = metadata.ResourceClaimTemplateFilePath(refDriver, c.podClaimName, "gpu")
	}
	if len(mounts) != 1 || mounts[0].ContainerPath != wantPath ||
		mounts[0].HostPath != strings.TrimPrefix(hostFile, root) {
		t.Errorf("CDI mounts %+v, want %s -> %s", mounts, hostFile, wantPath)
	}

	// KubeVirt v1.9.0's reader, on the file where the CDI mount puts it in the container.
	base := t.TempDir()
	inContainer := filepath.Join(base, strings.TrimPrefix(wantPath, drautil.DefaultMetadataBasePath))
	if err := os.MkdirAll(filepath.Dir(inContainer), 0o755); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(hostFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(inContainer, b, 0o644); err != nil {
		t.Fatal(err)
	}
	rc := kvv1.VirtualMachineInstanceResourceClaim{}
	rc.Name = "gpu"
	if c.podClaimName == "" {
		rc.ResourceClaimName = ptr.To(claim.Name)
	} else {
		rc.ResourceClaimTemplateName = ptr.To("gpu-template")
	}
	addr, err := drautil.GetPCIAddressForClaim(base, []kvv1.VirtualMachineInstanceResourceClaim{rc}, "gpu", "gpu")
	switch {
	case len(c.versions) == 1 && c.versions[0] == v1beta1:
		// KubeVirt 1.9 understands only v1alpha1: a v1beta1-only stream is refused.
		if err == nil || !strings.Contains(err.Error(), "no compatible metadata version") {
			t.Errorf("KubeVirt read a v1beta1-only stream: %q, %v", addr, err)
		}
	case err != nil || addr != refPCIBusID:
		t.Errorf("KubeVirt read %q, %v; want %s", addr, err, refPCIBusID)
	}
}
