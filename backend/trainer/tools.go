//go:build tools

// Package tools pins the main packages of the Kubeflow Trainer's controller manager and of the
// JobSet controller manager (sigs.k8s.io/jobset, the version the Trainer requires) into this
// module's graph, so that `go build` builds them at go.mod's versions.
package tools

import (
	_ "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager"
	_ "sigs.k8s.io/jobset"
)
