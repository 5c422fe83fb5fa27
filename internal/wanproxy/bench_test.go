package wanproxy

import (
	"context"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"
)

// BenchmarkProxyUnlimited measures what the proxy itself costs: 8 MiB GETs
// through an uncapped, zero-RTT proxy (compare with the upstream served
// directly).
func BenchmarkProxyUnlimited(b *testing.B) {
	up := startUpstream(b)
	_, base := startProxy(b, up.URL, Options{})
	for _, via := range []struct{ name, url string }{{"direct", up.URL.String()}, {"proxy", base}} {
		b.Run(via.name, func(b *testing.B) {
			c := newClient(b)
			b.SetBytes(blobSize)
			for b.Loop() {
				if r := fetch(context.Background(), c, http.MethodGet, via.url+"/blob", ""); r.err != nil || len(r.body) != blobSize {
					b.Fatalf("GET: %v, %d bytes", r.err, len(r.body))
				}
			}
		})
	}
}

// BenchmarkCapAccuracy measures how close parallel downloads come to the
// configured cap: the metric cap-ratio is achieved/configured throughput
// (1.0 is exact; above 1 would mean the cap leaks).
func BenchmarkCapAccuracy(b *testing.B) {
	up := startUpstream(b)
	const bps = 32 << 20
	for _, parallel := range []int{1, 4, 16} {
		b.Run(fmt.Sprintf("parallel=%d", parallel), func(b *testing.B) {
			_, base := startProxy(b, up.URL, Options{BytesPerSecond: bps})
			c := newClient(b)
			part := int64(blobSize / parallel)
			b.SetBytes(blobSize)
			var busy time.Duration
			for b.Loop() {
				start := time.Now()
				var wg sync.WaitGroup
				for i := range parallel {
					wg.Go(func() {
						rng := fmt.Sprintf("bytes=%d-%d", int64(i)*part, int64(i+1)*part-1)
						if r := fetch(context.Background(), c, http.MethodGet, base+"/blob", rng); r.err != nil || int64(len(r.body)) != part {
							b.Errorf("GET %s: %v, %d bytes", rng, r.err, len(r.body))
						}
					})
				}
				wg.Wait()
				busy += time.Since(start)
			}
			achieved := float64(blobSize) * float64(b.N) / busy.Seconds()
			b.ReportMetric(achieved/bps, "cap-ratio")
		})
	}
}
