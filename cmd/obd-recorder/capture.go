package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"os/signal"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/obdtrace/obdtrace/bpf"
	"github.com/obdtrace/obdtrace/bpf/jsonl"
)

type captureFlags struct {
	devices    []string
	duration   time.Duration
	output     string
	ringSize   int
	writes     bool
	completion bool
}

func newCaptureCmd() *cobra.Command {
	var f captureFlags
	cmd := &cobra.Command{
		Use:   "capture --device DEV [--device DEV...] [--duration 5s] [--output FILE]",
		Short: "Print the read requests issued to block devices as JSON lines",
		Long: `capture attaches the eBPF block-request probe, reports every read request
(readahead included) issued to the given devices as one JSON object per line,
and prints a summary (events, lost, duration, CPU time) on stderr at the end.

DEV is a block device path (/dev/loop3) or "major:minor". It stops after
--duration, or on SIGINT/SIGTERM, always after flushing every captured event.
With --output the file appears only when complete (temp file, fsync, rename).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runCapture(cmd.Context(), f, cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	fl := cmd.Flags()
	fl.StringArrayVarP(&f.devices, "device", "d", nil, "block device path or major:minor (repeatable)")
	fl.DurationVar(&f.duration, "duration", 0, "stop after this long (0: run until SIGINT/SIGTERM)")
	fl.StringVarP(&f.output, "output", "o", "", "write JSON lines to this file atomically (default: stdout)")
	fl.IntVar(&f.ringSize, "ring-size", bpf.DefaultRingSize, "ring buffer size in bytes (power of two)")
	fl.BoolVar(&f.writes, "writes", false, "also report write requests")
	fl.BoolVar(&f.completion, "latency", false, "attach block_rq_complete and add completion events with latency_ns")
	_ = cmd.MarkFlagRequired("device")
	return cmd
}

// captureStart is the first line on stderr: from then on requests are
// captured (scripts wait for it).
type captureStart struct {
	Devices []bpf.Dev `json:"capturing"`
	Mode    string    `json:"mode"`
}

// captureSummary is the last line on stderr; scripts/bench-capture.sh reads it.
type captureSummary struct {
	Events      int64   `json:"events"`
	Lost        uint64  `json:"lost"`
	DurationS   float64 `json:"duration_s"`
	CPUUserS    float64 `json:"cpu_user_s"` // whole process, loading included
	CPUSysS     float64 `json:"cpu_sys_s"`
	CaptureCPUS float64 `json:"capture_cpu_s"`                      // user+sys from attach to the end
	CPUPerMEvS  float64 `json:"cpu_s_per_million_events,omitempty"` // capture_cpu_s per 10^6 events
	Mode        string  `json:"mode"`
	Interrupted bool    `json:"interrupted,omitempty"`
}

func runCapture(ctx context.Context, f captureFlags, stdout, stderr io.Writer) error {
	devs := make([]bpf.Dev, 0, len(f.devices))
	for _, s := range f.devices {
		d, err := bpf.LookupDev(s)
		if err != nil {
			return fmt.Errorf("--device %q: %w", s, err)
		}
		devs = append(devs, d)
	}
	ctx, stop := signal.NotifyContext(ctx, syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	sigCtx := ctx

	out := stdout
	var file *jsonl.File
	if f.output != "" && f.output != "-" {
		var err error
		if file, err = jsonl.CreateFile(f.output); err != nil {
			return err
		}
		defer file.Abort() // no-op once committed
		out = file
	}

	c, err := bpf.Open(bpf.Options{Devices: devs, RingSize: f.ringSize, IncludeWrites: f.writes, Completion: f.completion})
	if err != nil {
		return err
	}
	defer c.Close()
	// Scripts wait for this line: from here on, requests are captured.
	if err := writeJSONLine(stderr, captureStart{Devices: devs, Mode: c.Mode().String()}); err != nil {
		return err
	}
	start, startCPU := time.Now(), cpuTime()
	if f.duration > 0 { // counted from attachment: loading can take a while
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, f.duration)
		defer cancel()
	}
	// Detaching, not cancelling Copy, is how capture stops: Copy then drains
	// the ring and flushes, so no captured event is lost on the way out.
	defer context.AfterFunc(ctx, func() { _ = c.Detach() })()

	n, err := jsonl.Copy(context.Background(), out, c)
	if err != nil {
		return fmt.Errorf("capture: %w", err)
	}
	sum := captureSummary{Events: n, DurationS: time.Since(start).Seconds(), Mode: c.Mode().String(),
		Interrupted: sigCtx.Err() != nil}
	if sum.Lost, err = c.Lost(); err != nil {
		return err
	}
	if file != nil {
		if err := file.Commit(); err != nil {
			return err
		}
	}
	if ru, ok := rusage(); ok {
		sum.CPUUserS = time.Duration(ru.Utime.Nano()).Seconds()
		sum.CPUSysS = time.Duration(ru.Stime.Nano()).Seconds()
		sum.CaptureCPUS = (cpuTime() - startCPU).Seconds()
		if n > 0 {
			sum.CPUPerMEvS = sum.CaptureCPUS * 1e6 / float64(n)
		}
	}
	return writeJSONLine(stderr, sum)
}

func writeJSONLine(w io.Writer, v any) error {
	line, err := json.Marshal(v)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", line)
	return err
}

// rusage is the process's CPU time, the figure the capture budget (0.5 s
// per million events) is stated in.
func rusage() (unix.Rusage, bool) {
	var ru unix.Rusage
	err := unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return ru, err == nil
}

func cpuTime() time.Duration {
	ru, _ := rusage()
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
