package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/internal/wanproxy"
)

type wanProxyFlags struct {
	listen      string
	upstream    string
	rate        string
	rtt         time.Duration
	dropRate    float64
	seed        uint64
	noSlowStart bool
	statsFile   string
	statsEvery  time.Duration
}

func newWANProxyCommand() *cobra.Command {
	var f wanProxyFlags
	cmd := &cobra.Command{
		Use:   "wan-proxy --upstream URL [--listen ADDR] [--rate RATE] [--rtt DURATION] [--drop-rate P]",
		Short: "Serve an HTTP proxy that puts an emulated WAN link (bandwidth, RTT, drops) in front of a registry",
		Long: "Serve an HTTP reverse proxy to --upstream over an emulated wide-area link, for benchmarks\n" +
			"and tests on one machine. The rate caps all responses together (and, separately, all\n" +
			"request bodies), like one bottleneck link; each request costs one RTT, a new connection\n" +
			"one more (handshake), and TCP slow start is modelled per connection. With --drop-rate P\n" +
			"each request's connection is cut mid-response with probability P.\n\n" +
			"RATE is bits or bytes per second, spelled out: 25mbit, 100kbit, 1gbit (bits, x1000),\n" +
			"3MB, 512KB (bytes, x1000), 3MiB (bytes, x1024); 0 or unlimited for no cap. \"mbps\" is\n" +
			"refused as ambiguous. The listening address is printed on stdout once the proxy serves.",
		Example: "  obdctl wan-proxy --listen 127.0.0.1:5001 --upstream http://127.0.0.1:5000 --rate 25mbit --rtt 40ms",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runWANProxy(cmd, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.listen, "listen", "127.0.0.1:0", "address to listen on (port 0 picks a free one)")
	fl.StringVar(&f.upstream, "upstream", "", "URL of the server behind the link, e.g. http://127.0.0.1:5000 (required)")
	fl.StringVar(&f.rate, "rate", "unlimited", "link rate: bits (25mbit, 100kbit) or bytes (3MB, 3MiB) per second")
	fl.DurationVar(&f.rtt, "rtt", 0, "round-trip time added to every request, e.g. 40ms")
	fl.Float64Var(&f.dropRate, "drop-rate", 0, "probability in [0, 1] that a request's connection is cut mid-response")
	fl.Uint64Var(&f.seed, "seed", 0, "seed of the drop decisions")
	fl.BoolVar(&f.noSlowStart, "no-slow-start", false, "do not model TCP slow start (fixed RTT per request only)")
	fl.StringVar(&f.statsFile, "stats-file", "", "write the settings and counters as JSON here, every --stats-interval and at exit")
	fl.DurationVar(&f.statsEvery, "stats-interval", time.Second, "how often to rewrite --stats-file")
	_ = cmd.MarkFlagRequired("upstream")
	return cmd
}

// wanProxyReport is the --stats-file content: the link's settings and the
// proxy's counters.
type wanProxyReport struct {
	Upstream       string  `json:"upstream"`
	Listen         string  `json:"listen"`
	BytesPerSecond int64   `json:"bytes_per_second"`
	Rate           string  `json:"rate"`
	RTTMillis      float64 `json:"rtt_ms"`
	DropRate       float64 `json:"drop_rate"`
	wanproxy.Stats
}

func runWANProxy(cmd *cobra.Command, f wanProxyFlags) error {
	ctx := cmd.Context()
	log := zerolog.Ctx(ctx)
	up, err := url.Parse(f.upstream)
	if err != nil {
		return fmt.Errorf("--upstream %q: %w", f.upstream, err)
	}
	bps, err := wanproxy.ParseRate(f.rate)
	if err != nil {
		return fmt.Errorf("--rate: %w", err)
	}
	if f.statsEvery <= 0 {
		return fmt.Errorf("--stats-interval %v: must be positive", f.statsEvery)
	}
	p, err := wanproxy.New(up, wanproxy.Options{
		BytesPerSecond: bps, RTT: f.rtt, DropRate: f.dropRate, Seed: f.seed,
		DisableSlowStart: f.noSlowStart, Logger: *log,
	})
	if err != nil {
		return err
	}
	addr, stop, err := p.Start(ctx, f.listen)
	if err != nil {
		return err
	}
	report := wanProxyReport{
		Upstream: up.String(), Listen: addr, BytesPerSecond: bps, Rate: wanproxy.FormatRate(bps),
		RTTMillis: float64(f.rtt) / float64(time.Millisecond), DropRate: f.dropRate,
	}
	log.Info().Str("listen", addr).Str("upstream", report.Upstream).Str("rate", report.Rate).
		Dur("rtt", f.rtt).Float64("drop_rate", f.dropRate).Msg("wan-proxy serving")
	fmt.Fprintln(cmd.OutOrStdout(), addr)

	writeStats := func() error {
		if f.statsFile == "" {
			return nil
		}
		report.Stats = p.Stats()
		b, err := json.MarshalIndent(report, "", "  ")
		if err != nil {
			return err
		}
		if err := atomicfile.Write(f.statsFile, append(b, '\n'), 0o644); err != nil {
			return fmt.Errorf("--stats-file: %w", err)
		}
		return nil
	}
	werr := tick(ctx, f.statsEvery, writeStats)
	serr := stop()
	if err := writeStats(); werr == nil {
		werr = err
	}
	st := p.Stats()
	log.Info().Int64("requests", st.Requests).Int64("bytes", st.Bytes).Int64("dropped", st.Dropped).Msg("wan-proxy stopped")
	if serr != nil {
		return serr
	}
	return werr
}

// tick runs fn now and every interval until ctx ends or fn fails.
func tick(ctx context.Context, every time.Duration, fn func() error) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		if err := fn(); err != nil {
			return err
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
