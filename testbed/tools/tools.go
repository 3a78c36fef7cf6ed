//go:build tools

// Package tools pins the tools ./build builds (go.mod holds their versions).
package tools

import (
	_ "github.com/rhysd/actionlint/cmd/actionlint"
)
