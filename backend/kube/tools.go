//go:build tools

// Package tools pins the main packages of kube-apiserver and kube-controller-manager into this
// module's graph, so that `go build k8s.io/kubernetes/cmd/...` builds them at go.mod's version.
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
