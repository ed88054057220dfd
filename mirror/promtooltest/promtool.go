// Package promtooltest finds or builds Prometheus's promtool for tests of
// the dashboard and rules slipway prints: a separate program, run, never
// imported (Prometheus's module would bring hundreds of dependencies).
package promtooltest

import (
	"testing"

	"slipway/cmd/tooltest"
)

// Version is the Prometheus module version whose cmd/promtool the tests
// run (.ci/run builds the same one). Prometheus's Go module versions are
// v0.3xx.y for its 3.xx.y releases.
const Version = "v0.316.0"

// Promtool is the pinned promtool the tests run.
var Promtool = &tooltest.Tool{Name: "promtool", Package: "github.com/prometheus/prometheus/cmd/promtool", Version: Version,
	Dir: "promtool-" + Version, Env: "SLIPWAY_PROMTOOL", Build: "about 9 minutes on 2 busy cores"}

// Binary finds or builds promtool (see tooltest.Tool.Binary).
func Binary(t testing.TB) string { return Promtool.Binary(t) }
