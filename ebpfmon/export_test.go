package ebpfmon

import (
	"fmt"
	"strings"

	"github.com/cilium/ebpf"
)

// TracepointsForTest lists the tracepoints the monitor's programs attach
// to, as "group/name", for the overhead benchmark's floor: empty programs on
// exactly these.
func TracepointsForTest() ([]string, error) {
	spec, err := loadMonitor()
	if err != nil {
		return nil, err
	}
	var tps []string
	for _, p := range spec.Programs {
		if p.Type != ebpf.TracePoint {
			return nil, fmt.Errorf("program %s is a %v, not a tracepoint: the floor would not match the monitor", p.Name, p.Type)
		}
		tps = append(tps, strings.TrimPrefix(p.SectionName, "tracepoint/"))
	}
	return tps, nil
}
