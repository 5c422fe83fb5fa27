package record

import (
	"fmt"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
)

// ParseMount parses a mount in ctr's --mount syntax,
// "type=bind,src=/host/path,dst=/container/path,options=rbind:ro". The type
// defaults to bind, and a bind mount's options to rbind:ro: a recording
// should not change the host.
func ParseMount(s string) (specs.Mount, error) {
	m := specs.Mount{Type: "bind"}
	for _, field := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(field, "=")
		if !ok {
			return m, fmt.Errorf("%w: mount %q: field %q is not key=value", ErrOptions, s, field)
		}
		switch k {
		case "type":
			m.Type = v
		case "source", "src":
			m.Source = v
		case "destination", "dst", "target":
			m.Destination = v
		case "options":
			m.Options = strings.Split(v, ":")
		default:
			return m, fmt.Errorf("%w: mount %q: unknown key %q (want type, src, dst, options)", ErrOptions, s, k)
		}
	}
	if m.Source == "" || m.Type == "" || !filepath.IsAbs(m.Destination) {
		return m, fmt.Errorf("%w: mount %q: want a type, a source and an absolute destination", ErrOptions, s)
	}
	if m.Options == nil && m.Type == "bind" {
		m.Options = []string{"rbind", "ro"}
	}
	return m, nil
}
