//go:build tools

// Package tools pins the commands built from third-party modules, so `go mod tidy` keeps them
// (and their exact versions) in go.mod/go.sum. The build tag keeps this file out of normal
// builds: these imports are main packages, which only `go build <path>` can build.
package tools

import (
	_ "github.com/yannh/kubeconform/cmd/kubeconform"
	_ "helm.sh/helm/v4/cmd/helm"
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
