package backstore

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/internal/iox"
)

// MaxRecordingStatsSize bounds what ReadRecordingStats reads of a .ok file:
// the JSON a recording writes is well under a hundred bytes.
const MaxRecordingStatsSize = 64 << 10

// ErrRecordingStats is wrapped when a .ok file holds something other than
// nothing (upstream's) or the JSON a recording writes.
var ErrRecordingStats = errors.New("backstore: invalid recording stats")

// RecordingStats is what a recording writes into <trace>.ok once the trace
// is complete. Upstream only checks that the file exists and writes it
// empty, so every field may be unknown.
type RecordingStats struct {
	// Lost is the number of block requests the capture dropped; nil when
	// unknown.
	Lost *uint64 `json:"lost,omitempty"`
	// Frames and Bytes count what the trace holds (0 when unknown).
	Frames int   `json:"frames"`
	Bytes  int64 `json:"bytes"`
}

// ReadRecordingStats reads the .ok file at path. An empty file, as
// upstream writes, gives stats with every field unknown; anything that is
// not a JSON object of the fields above, or is larger than
// MaxRecordingStatsSize, wraps ErrRecordingStats.
func ReadRecordingStats(path string) (RecordingStats, error) {
	data, err := iox.ReadFileLimit(path, MaxRecordingStatsSize)
	if errors.Is(err, iox.ErrTooLarge) {
		return RecordingStats{}, fmt.Errorf("%w: %w", ErrRecordingStats, err)
	}
	if err != nil {
		return RecordingStats{}, fmt.Errorf("backstore: recording stats: %w", err)
	}
	st, err := parseRecordingStats(data)
	if err != nil {
		return RecordingStats{}, fmt.Errorf("%s: %w", path, err)
	}
	return st, nil
}

func parseRecordingStats(data []byte) (RecordingStats, error) {
	var st RecordingStats
	if len(data) > MaxRecordingStatsSize {
		return st, fmt.Errorf("%w: over %d bytes", ErrRecordingStats, MaxRecordingStatsSize)
	}
	if len(bytes.TrimSpace(data)) == 0 {
		return st, nil
	}
	if err := json.Unmarshal(data, &st); err != nil {
		return RecordingStats{}, fmt.Errorf("%w: %w", ErrRecordingStats, err)
	}
	if st.Frames < 0 || st.Bytes < 0 {
		return RecordingStats{}, fmt.Errorf("%w: negative count (%d frames, %d bytes)", ErrRecordingStats, st.Frames, st.Bytes)
	}
	return st, nil
}

// writeRecordingStats writes st to path as a finished recording's .ok.
func writeRecordingStats(path string, st RecordingStats) error {
	data, err := json.Marshal(st)
	if err != nil {
		return err
	}
	return atomicfile.Write(path, data, 0o644)
}
