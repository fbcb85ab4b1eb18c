//go:build tools

// Package tools pins kube-apiserver's main package into this module's graph, so that
// `go build k8s.io/kubernetes/cmd/kube-apiserver` builds it at the version go.mod names.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
