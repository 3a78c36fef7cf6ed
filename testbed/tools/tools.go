//go:build tools

// Package tools pins the tools ./build builds (go.mod holds their versions).
package tools

import (
	_ "github.com/distribution/distribution/v3/cmd/registry"
	_ "github.com/rhysd/actionlint/cmd/actionlint"
)
