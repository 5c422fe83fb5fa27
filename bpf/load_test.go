package bpf_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os/exec"
	"testing"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/bpf/bpftest"
)

// fioResult is the part of `fio --output-format=json` the tests use.
type fioResult struct {
	Jobs []struct {
		Read struct {
			TotalIOs uint64  `json:"total_ios"`
			IOPS     float64 `json:"iops"`
		} `json:"read"`
	} `json:"jobs"`
}

// runFio runs 4k random reads at queue depth 32 with direct I/O on path.
func runFio(ctx context.Context, fio, path string, seconds int) (fioResult, error) {
	cmd := exec.CommandContext(ctx, fio, "--name=load", "--filename="+path,
		"--rw=randread", "--bs=4k", "--iodepth=32", "--ioengine=io_uring", "--direct=1",
		"--time_based", fmt.Sprintf("--runtime=%d", seconds), "--output-format=json")
	out, err := cmd.Output()
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return fioResult{}, fmt.Errorf("fio: %w: %s", err, ee.Stderr)
		}
		return fioResult{}, fmt.Errorf("fio: %w", err)
	}
	var res fioResult
	if err := json.Unmarshal(out, &res); err != nil {
		return fioResult{}, fmt.Errorf("fio output: %w", err)
	}
	if len(res.Jobs) != 1 || res.Jobs[0].Read.TotalIOs == 0 {
		return fioResult{}, fmt.Errorf("fio output: want one job with reads, got %+v", res)
	}
	return res, nil
}

// countReads reads c until it is detached and drained, counting read issues
// on dev.
func countReads(c *bpf.Capture, dev bpf.Dev) (uint64, error) {
	var (
		ev bpf.Event
		n  uint64
	)
	for {
		err := c.Read(context.Background(), &ev)
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		if ev.Kind == bpf.KindIssue && ev.Dev == dev && ev.Op&bpf.OpRead != 0 {
			n++
		}
	}
}

// Under fio's 4k random reads at QD32 for 10 s, the default ring loses
// nothing and every I/O fio completed is reported once.
func TestUnderFioLoad(t *testing.T) {
	if testing.Short() {
		t.Skip("skipping the 10 s fio run in -short mode")
	}
	bpftest.Require(t)
	fio := bpftest.RequireTool(t, "fio")
	dir := bpftest.Tmpfs(t, 600<<20)
	l := bpftest.NewLoop(t, dir, 512<<20)
	dev := devOf(t, l)
	c := open(t, bpf.Options{Devices: []bpf.Dev{dev}})

	type count struct {
		n   uint64
		err error
	}
	done := make(chan count, 1)
	go func() {
		n, err := countReads(c, dev)
		done <- count{n, err}
	}()
	res, err := runFio(context.Background(), fio, l.Path, 10)
	if derr := c.Detach(); derr != nil {
		t.Fatal(derr)
	}
	got := <-done
	if err != nil {
		t.Fatal(err)
	}
	if got.err != nil {
		t.Fatal(got.err)
	}
	lost, err := c.Lost()
	if err != nil {
		t.Fatal(err)
	}
	ios := res.Jobs[0].Read.TotalIOs
	t.Logf("fio: %d I/Os, %.0f IOPS; captured %d reads, lost %d", ios, res.Jobs[0].Read.IOPS, got.n, lost)
	if lost != 0 {
		t.Errorf("lost %d events at the default ring size (%d bytes)", lost, bpf.DefaultRingSize)
	}
	diff := int64(got.n) - int64(ios)
	if diff < 0 {
		diff = -diff
	}
	if uint64(diff)*100 > ios {
		t.Errorf("captured %d reads, fio completed %d: off by %d, more than 1%%", got.n, ios, diff)
	}
}
