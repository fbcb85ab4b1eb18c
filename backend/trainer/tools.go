//go:build tools

// Package tools pins the Kubeflow Trainer's controller manager main package into this module's
// graph, so that `go build github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager` builds
// it at go.mod's version.
package tools

import (
	_ "github.com/kubeflow/trainer/v2/cmd/trainer-controller-manager"
)
