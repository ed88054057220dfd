package main

import (
	"fmt"
	"io"

	"slipway/mirror"
)

const monitoringUsage = `Usage:
  slipway monitoring dashboard   print a Grafana dashboard (JSON) of slipway's metrics
  slipway monitoring rules       print Prometheus alert rules (YAML) for slipway

Both are generated from the metrics the server registers. Import the
dashboard in Grafana (Dashboards > New > Import) and pick a Prometheus data
source; list the rules file under rule_files in prometheus.yml.
`

// monitoringCmd prints the dashboard or the rules to stdout.
func monitoringCmd(args []string, stdout, stderr io.Writer) int {
	if len(args) == 1 && (args[0] == "-h" || args[0] == "--help" || args[0] == "help") {
		fmt.Fprint(stdout, monitoringUsage)
		return 0
	}
	if len(args) != 1 {
		fmt.Fprint(stderr, monitoringUsage)
		return 2
	}
	var out []byte
	var err error
	switch args[0] {
	case "dashboard":
		out, err = mirror.Dashboard()
	case "rules":
		out, err = mirror.Rules()
	default:
		fmt.Fprintf(stderr, "slipway monitoring: unknown %q\n\n%s", args[0], monitoringUsage)
		return 2
	}
	if err != nil {
		fmt.Fprintln(stderr, "slipway monitoring:", err)
		return 1
	}
	if _, err := stdout.Write(out); err != nil {
		fmt.Fprintln(stderr, "slipway monitoring:", err)
		return 1
	}
	return 0
}
