package main

// dra-harness cdi --spec-dir DIR [--spec-dir DIR2 ...] [--inject] CDI_ID...
//
// Loads the spec directories with the CDI project's library
// (tags.cncf.io/container-device-interface/pkg/cdi), reports every spec error, resolves each
// fully-qualified device ID (vendor/class=name) into its container edits (the spec's own edits
// first, then the device's, as the library's InjectDevices merges them), and with --inject
// applies them to an empty OCI spec as a container runtime does (device nodes must then exist:
// type/major/minor come from stat). Exit 1 if a spec has errors or an ID does not resolve (the
// JSON is still printed).

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	oci "github.com/opencontainers/runtime-spec/specs-go"
	"tags.cncf.io/container-device-interface/pkg/cdi"
	cdispec "tags.cncf.io/container-device-interface/specs-go"
)

type cdiDeviceOut struct {
	Spec  string                 `json:"spec"`
	Edits cdispec.ContainerEdits `json:"edits"`
}

type cdiOut struct {
	SpecErrors map[string][]string     `json:"specErrors"`
	Devices    map[string]cdiDeviceOut `json:"devices"`
	Unresolved []string                `json:"unresolved"`
	Merged     cdispec.ContainerEdits  `json:"merged"`
	OCI        *oci.Spec               `json:"oci,omitempty"`
	InjectErr  string                  `json:"injectError,omitempty"`
}

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

func runCDI(args []string) error {
	fs := newFlags("cdi")
	var dirs stringList
	fs.Var(&dirs, "spec-dir", "CDI spec directory (repeatable; later ones take precedence)")
	inject := fs.Bool("inject", false, "also apply the edits to an empty OCI spec")
	if err := parse(fs, args); err != nil {
		return err
	}
	if len(dirs) == 0 || fs.NArg() == 0 {
		return usageError{"need at least one --spec-dir and one CDI device ID"}
	}
	cache, err := cdi.NewCache(cdi.WithSpecDirs(dirs...), cdi.WithAutoRefresh(false))
	if err != nil && cache == nil {
		return err
	}
	out := cdiOut{SpecErrors: map[string][]string{}, Devices: map[string]cdiDeviceOut{},
		Unresolved: []string{}}
	for file, errs := range cache.GetErrors() {
		for _, e := range errs {
			out.SpecErrors[file] = append(out.SpecErrors[file], e.Error())
		}
	}
	merged := &cdi.ContainerEdits{ContainerEdits: &cdispec.ContainerEdits{}}
	seenSpecs := map[*cdi.Spec]bool{}
	for _, id := range fs.Args() {
		dev := cache.GetDevice(id)
		if dev == nil {
			out.Unresolved = append(out.Unresolved, id)
			continue
		}
		spec := dev.GetSpec()
		edits := &cdi.ContainerEdits{ContainerEdits: &cdispec.ContainerEdits{}}
		edits.Append(&cdi.ContainerEdits{ContainerEdits: &spec.ContainerEdits})
		edits.Append(&cdi.ContainerEdits{ContainerEdits: &dev.ContainerEdits})
		out.Devices[id] = cdiDeviceOut{Spec: spec.GetPath(), Edits: *edits.ContainerEdits}
		if !seenSpecs[spec] {
			seenSpecs[spec] = true
			merged.Append(&cdi.ContainerEdits{ContainerEdits: &spec.ContainerEdits})
		}
		merged.Append(&cdi.ContainerEdits{ContainerEdits: &dev.ContainerEdits})
	}
	out.Merged = *merged.ContainerEdits
	if *inject && len(out.Unresolved) == 0 {
		out.OCI = &oci.Spec{Process: &oci.Process{}, Linux: &oci.Linux{}}
		if _, err := cache.InjectDevices(out.OCI, fs.Args()...); err != nil {
			out.InjectErr = err.Error()
		}
	}
	if err := printJSON(out); err != nil {
		return err
	}
	var problems []string
	files := make([]string, 0, len(out.SpecErrors))
	for f := range out.SpecErrors {
		files = append(files, f)
	}
	sort.Strings(files)
	for _, f := range files {
		problems = append(problems, fmt.Sprintf("%s: %s", f, strings.Join(out.SpecErrors[f], "; ")))
	}
	if len(out.Unresolved) > 0 {
		problems = append(problems, "unresolved CDI devices: "+strings.Join(out.Unresolved, ", "))
	}
	if out.InjectErr != "" {
		problems = append(problems, out.InjectErr)
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}
