package convert

import (
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"
)

// countingReader counts the bytes read through it; the count may be read
// from another goroutine.
type countingReader struct {
	r io.Reader
	n atomic.Int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n.Add(int64(n))
	return n, err
}

// progressInterval is how often a terminal's progress line is redrawn.
const progressInterval = 200 * time.Millisecond

// layerProgress redraws one status line for a layer on a terminal while
// it is being applied: how much of the source blob has been read.
type layerProgress struct {
	w     io.Writer
	label string
	total int64
	read  func() int64
	start time.Time
	stop  chan struct{}
	done  sync.WaitGroup
}

// startProgress starts drawing on w (nil: draws nothing).
func startProgress(w io.Writer, label string, total int64, read func() int64) *layerProgress {
	p := &layerProgress{w: w, label: label, total: total, read: read, start: time.Now(), stop: make(chan struct{})}
	if w == nil {
		return p
	}
	p.done.Add(1)
	go func() {
		defer p.done.Done()
		t := time.NewTicker(progressInterval)
		defer t.Stop()
		for {
			select {
			case <-p.stop:
				return
			case <-t.C:
				p.draw("")
			}
		}
	}()
	return p
}

func (p *layerProgress) draw(end string) {
	n := p.read()
	secs := max(time.Since(p.start).Seconds(), 1e-3)
	fmt.Fprintf(p.w, "\r\033[K%s %s / %s (%.1f MiB/s)%s", p.label, mib(n), mib(p.total), float64(n)/secs/(1<<20), end)
}

// finish stops the redraws and ends the line with a final state.
func (p *layerProgress) finish(status string) {
	if p.w == nil {
		return
	}
	close(p.stop)
	p.done.Wait()
	p.draw(" " + status + "\n")
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
