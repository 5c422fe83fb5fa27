package snapshotter

import (
	"os"
	"path/filepath"
	"testing"
)

// TestReplayedBytes reads stats files of a server with replay totals and
// of an older one without: the counter follows the totals when present.
func TestReplayedBytes(t *testing.T) {
	for _, c := range []struct {
		name, file string
		want       int64
	}{
		{"totals", `{"replay":{"source":"b","bytes_prefetched":50},"replay_totals":{"replays":2,"bytes_prefetched":150}}`, 150},
		{"older server", `{"replay":{"source":"a","bytes_prefetched":70}}`, 70},
		{"no replay", `{"ref":"r"}`, 0},
	} {
		path := filepath.Join(t.TempDir(), "stats.json")
		if err := os.WriteFile(path, []byte(c.file), 0o644); err != nil {
			t.Fatal(err)
		}
		st, ok := readStats(path)
		if got := replayedBytes(st); !ok || got != c.want {
			t.Errorf("%s: replayed bytes %d, want %d", c.name, got, c.want)
		}
	}
}
