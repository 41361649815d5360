package main

// dra-harness metadata --file PATH
// dra-harness metadata --dir BASE --claim NAME --request REQ [--template] [--driver D]
//
// Decodes a KEP-5304 device-metadata file with upstream k8s.io/dynamic-resource-allocation
// devicemetadata.DecodeMetadataFromStream (first version of the stream the scheme knows wins;
// validation on) and prints it with each device's resource.kubernetes.io/pciBusID.
// --dir resolves the in-container layout under BASE (BASE stands for
// /var/run/kubernetes.io/dra-device-attributes): resourceclaims/<claim>/<request>/ or, with
// --template, resourceclaimtemplates/<podClaimName>/<request>/, file <driver>-metadata.json
// (without --driver: the only *-metadata.json there).

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/dynamic-resource-allocation/api/metadata"
	metadatav1beta1 "k8s.io/dynamic-resource-allocation/api/metadata/v1beta1"
	"k8s.io/dynamic-resource-allocation/deviceattribute"
	"k8s.io/dynamic-resource-allocation/devicemetadata"
)

type metadataDevice struct {
	Request  string `json:"request"`
	Driver   string `json:"driver"`
	Pool     string `json:"pool"`
	Name     string `json:"name"`
	PCIBusID string `json:"pciBusID"`
}

type metadataOut struct {
	File string `json:"file"`
	// DecodedFrom is the apiVersion of the stream entry the decoder used.
	DecodedFrom string                          `json:"decodedFrom"`
	Metadata    *metadatav1beta1.DeviceMetadata `json:"metadata"`
	Devices     []metadataDevice                `json:"devices"`
}

func runMetadata(args []string) error {
	fs := newFlags("metadata")
	file := fs.String("file", "", "metadata file to decode")
	base := fs.String("dir", "", "in-container base directory (instead of --file)")
	claim := fs.String("claim", "", "with --dir: claim name (podClaimName with --template)")
	request := fs.String("request", "", "with --dir: request name")
	template := fs.Bool("template", false, "with --dir: the claim comes from a template")
	driver := fs.String("driver", "", "with --dir: driver name (default: the only file)")
	if err := parse(fs, args); err != nil {
		return err
	}
	path := *file
	switch {
	case (*file == "") == (*base == ""):
		return usageError{"give exactly one of --file and --dir"}
	case *base != "":
		if err := required(map[string]string{"claim": *claim, "request": *request}); err != nil {
			return err
		}
		sub := metadata.ResourceClaimsSubDir
		if *template {
			sub = metadata.ResourceClaimTemplatesSubDir
		}
		dir := filepath.Join(*base, sub, *claim, *request)
		if *driver != "" {
			path = filepath.Join(dir, metadata.MetadataFileName(*driver))
		} else {
			matches, err := filepath.Glob(filepath.Join(dir, "*"+metadata.MetadataFileSuffix))
			if err != nil {
				return err
			}
			if len(matches) != 1 {
				return fmt.Errorf("%d metadata files in %s, expected exactly one (use --driver)",
					len(matches), dir)
			}
			path = matches[0]
		}
	}
	out, err := decodeMetadataFile(path)
	if err != nil {
		return err
	}
	return printJSON(out)
}

func decodeMetadataFile(path string) (*metadataOut, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var dm metadatav1beta1.DeviceMetadata
	var gvk schema.GroupVersionKind
	var invalid error
	if err := devicemetadata.DecodeMetadataFromStream(json.NewDecoder(f), &dm,
		devicemetadata.DecodeMetadataStoreGVKResult(&gvk),
		devicemetadata.DecodeMetadataWithValidationResult(&invalid)); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if invalid != nil {
		return nil, fmt.Errorf("%s: %s is not valid: %w", path, gvk.GroupVersion(), invalid)
	}
	out := &metadataOut{File: path, DecodedFrom: gvk.GroupVersion().String(), Metadata: &dm,
		Devices: []metadataDevice{}}
	for _, r := range dm.Requests {
		for _, d := range r.Devices {
			md := metadataDevice{Request: r.Name, Driver: d.Driver, Pool: d.Pool, Name: d.Name}
			if a, ok := d.Attributes[deviceattribute.StandardDeviceAttributePCIBusID]; ok &&
				a.StringValue != nil {
				md.PCIBusID = *a.StringValue
			}
			out.Devices = append(out.Devices, md)
		}
	}
	return out, nil
}
