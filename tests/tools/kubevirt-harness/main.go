// Command kubevirt-harness runs KubeVirt's own virt-launcher host-device code
// (kubevirt.io/kubevirt v1.9.0, pkg/virt-launcher/virtwrap/device/hostdevice: the generic and gpu
// builders with their address pools from PCI_RESOURCE_* / MDEV_PCI_RESOURCE_*, and the DRA
// builders reading KEP-5304 device-metadata files through pkg/dra) on a VMI and the environment
// its virt-launcher container would get, and prints the domain <hostdev> entries it builds.
//
// The calls and their order are those of virt-launcher's
// LibvirtDomainManager.generateConverterContext (not a migration target):
// generic.CreateHostDevices, dra.CreateDRAHostDevices, gpu.CreateHostDevices,
// dra.CreateDRAGPUHostDevices. Like virt-launcher it stops at the first error.
//
// Usage:
//
//	kubevirt-harness < input.json
//
// Stdin: ONE JSON object
//
//	{"vmi": <VirtualMachineInstance (kubevirt.io/v1), at least spec.domain.devices>,
//	 "env": {"PCI_RESOURCE_EXAMPLE_COM_GPU": "0000:17:00.0,...", ...},
//	 "draMetadataDir": "/path"}   // optional; KubeVirt's default is
//	                               // /var/run/kubernetes.io/dra-device-attributes
//
// The process environment is replaced by "env" before KubeVirt's code runs, so the address pools
// see exactly what the test gives (what the kubelet put into the container), nothing else.
// An unknown top-level field is an input error (exit 2), so a typo cannot pass silently.
//
// Stdout: ONE JSON object
//
//	{"hostDevices": [dev...], "gpus": [dev...], "error": null | {"stage": "...", "message": "..."}}
//
// dev = {"alias": "ua-gpu-gpu1" (the domain XML alias name), "type": "pci"|"mdev",
//
//	"managed": "no", "pciAddress": "0000:17:00.0" (pci: the <source><address>),
//	"mdevUUID": "..." (mdev), "display": "on"|"", "ramfb": "on"|"",
//	"xml": "<hostdev ...>...</hostdev>" (the element virt-launcher puts into the domain)}
//
// "hostDevices" holds what the generic and DRA generic builders made (virt-launcher's
// GenericHostDevices), "gpus" the GPU and DRA GPU ones (GPUHostDevices). "error" is KubeVirt's
// error text verbatim, with the function that returned it as "stage".
//
// Exit status: 0 when KubeVirt built the devices; 3 when KubeVirt returned an error (the JSON
// object is still printed); 2 on bad input; 1 on any other failure. KubeVirt's own log lines go to
// stderr.
package main

import (
	"bytes"
	"encoding/json"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	v1 "kubevirt.io/api/core/v1"

	drautil "kubevirt.io/kubevirt/pkg/dra"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/api"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/device/hostdevice/dra"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/device/hostdevice/generic"
	"kubevirt.io/kubevirt/pkg/virt-launcher/virtwrap/device/hostdevice/gpu"
)

type input struct {
	VMI            *v1.VirtualMachineInstance `json:"vmi"`
	Env            map[string]string          `json:"env"`
	DRAMetadataDir string                     `json:"draMetadataDir"`
}

type deviceOut struct {
	Alias      string `json:"alias"`
	Type       string `json:"type"`
	Managed    string `json:"managed"`
	PCIAddress string `json:"pciAddress,omitempty"`
	MDevUUID   string `json:"mdevUUID,omitempty"`
	Display    string `json:"display"`
	RamFB      string `json:"ramfb"`
	XML        string `json:"xml"`
}

type stageError struct {
	Stage   string `json:"stage"`
	Message string `json:"message"`
}

type output struct {
	HostDevices []deviceOut `json:"hostDevices"`
	GPUs        []deviceOut `json:"gpus"`
	Error       *stageError `json:"error"`
}

func main() {
	if len(os.Args) > 1 {
		fmt.Fprintln(os.Stderr, "kubevirt-harness: takes no arguments; the input is JSON on stdin"+
			" (see the top of tests/tools/kubevirt-harness/main.go)")
		os.Exit(2)
	}
	in, err := readInput(os.Stdin)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kubevirt-harness: bad input: %v\n", err)
		os.Exit(2)
	}
	out, err := run(in)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kubevirt-harness: %v\n", err)
		os.Exit(1)
	}
	enc := json.NewEncoder(os.Stdout)
	enc.SetEscapeHTML(false) // keep the "xml" field readable
	if err := enc.Encode(out); err != nil {
		fmt.Fprintf(os.Stderr, "kubevirt-harness: %v\n", err)
		os.Exit(1)
	}
	if out.Error != nil {
		os.Exit(3)
	}
}

func readInput(r io.Reader) (*input, error) {
	dec := json.NewDecoder(r)
	dec.DisallowUnknownFields()
	var in input
	if err := dec.Decode(&in); err != nil {
		return nil, err
	}
	if dec.More() {
		return nil, errors.New("more than one JSON value on stdin")
	}
	if in.VMI == nil {
		return nil, errors.New(`"vmi" is required`)
	}
	for name := range in.Env {
		if name == "" || strings.ContainsAny(name, "=\x00") {
			return nil, fmt.Errorf("env name %q cannot be set", name)
		}
	}
	if in.DRAMetadataDir == "" {
		in.DRAMetadataDir = drautil.DefaultMetadataBasePath
	}
	return &in, nil
}

// run makes the calls of virt-launcher's generateConverterContext, in its order.
func run(in *input) (*output, error) {
	os.Clearenv()
	for name, value := range in.Env {
		if err := os.Setenv(name, value); err != nil {
			return nil, fmt.Errorf("setting env %s: %w", name, err)
		}
	}
	vmi := in.VMI
	out := &output{HostDevices: []deviceOut{}, GPUs: []deviceOut{}}
	stages := []struct {
		name  string
		into  *[]deviceOut
		build func() ([]api.HostDevice, error)
	}{
		{"generic.CreateHostDevices", &out.HostDevices, func() ([]api.HostDevice, error) {
			return generic.CreateHostDevices(vmi.Spec.Domain.Devices.HostDevices)
		}},
		{"dra.CreateDRAHostDevices", &out.HostDevices, func() ([]api.HostDevice, error) {
			return dra.CreateDRAHostDevices(vmi, in.DRAMetadataDir)
		}},
		{"gpu.CreateHostDevices", &out.GPUs, func() ([]api.HostDevice, error) {
			return gpu.CreateHostDevices(vmi.Spec.Domain.Devices.GPUs)
		}},
		{"dra.CreateDRAGPUHostDevices", &out.GPUs, func() ([]api.HostDevice, error) {
			return dra.CreateDRAGPUHostDevices(vmi, in.DRAMetadataDir)
		}},
	}
	for _, s := range stages {
		devs, err := s.build()
		if err != nil {
			out.Error = &stageError{Stage: s.name, Message: err.Error()}
			return out, nil
		}
		for i := range devs {
			d, err := describe(&devs[i])
			if err != nil {
				return nil, err
			}
			*s.into = append(*s.into, d)
		}
	}
	return out, nil
}

func describe(dev *api.HostDevice) (deviceOut, error) {
	var x bytes.Buffer
	enc := xml.NewEncoder(&x)
	if err := enc.Encode(dev); err != nil {
		return deviceOut{}, fmt.Errorf("encoding hostdev XML: %w", err)
	}
	d := deviceOut{
		Type: dev.Type, Managed: dev.Managed, Display: dev.Display, RamFB: dev.RamFB,
		XML: x.String(),
	}
	if dev.Alias != nil {
		// The name as it appears in the domain XML (user-defined aliases get "ua-").
		var a struct {
			Alias struct {
				Name string `xml:"name,attr"`
			} `xml:"alias"`
		}
		if err := xml.Unmarshal(x.Bytes(), &a); err != nil {
			return deviceOut{}, fmt.Errorf("reading alias back: %w", err)
		}
		d.Alias = a.Alias.Name
	}
	if src := dev.Source.Address; src != nil {
		if src.UUID != "" {
			d.MDevUUID = src.UUID
		} else {
			addr, err := pciString(src)
			if err != nil {
				return deviceOut{}, err
			}
			d.PCIAddress = addr
		}
	}
	return d, nil
}

// pciString turns the domain's hex fields (0x0000, 0x17, 0x00, 0x0) back into 0000:17:00.0.
func pciString(a *api.Address) (string, error) {
	var n [4]uint64
	for i, f := range []string{a.Domain, a.Bus, a.Slot, a.Function} {
		v, err := strconv.ParseUint(strings.TrimPrefix(f, "0x"), 16, 32)
		if err != nil {
			return "", fmt.Errorf("source address field %q: %w", f, err)
		}
		n[i] = v
	}
	return fmt.Sprintf("%04x:%02x:%02x.%x", n[0], n[1], n[2], n[3]), nil
}
