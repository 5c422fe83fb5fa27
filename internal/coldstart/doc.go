// Package coldstart owns the cold-start benchmark of trace replay: it
// mounts an overlaybd image through an emulated WAN link (internal/wanproxy)
// with the block backstore, runs a start-up workload on it, and times the
// start (mount to workload exit) in four variants side by side: no
// prefetch, trace replay, full prefetch before start, and a warm cache. It
// also turns the samples into the medians, the checks of issue #7, a
// markdown table and a PNG bar chart.
//
// The benchmark itself is BenchmarkColdStart (bench_test.go), driven by
// scripts/bench-coldstart.sh; this package holds what it runs so the
// pieces are unit-tested.
package coldstart
