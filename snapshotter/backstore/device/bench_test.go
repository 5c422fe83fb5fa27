package device

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The device benchmarks drive fio against the device and against a plain
// loop device over the same local file, and report each variant as a ratio
// of that baseline. They take minutes and a 1 GiB file, so they run only
// when OBD_BENCH_DEVICE=1:
//
//	OBD_BENCH_DEVICE=1 go test -run '^$' -bench 'BenchmarkDevice$' ./snapshotter/backstore/device/
//
// OBD_BENCH_SIZE (bytes, default 1 GiB), OBD_BENCH_RUNTIME (seconds per
// fio run, default 2), OBD_BENCH_ROUNDS (paired runs, default 5) and
// OBD_BENCH_VARIANTS (a regexp of variant names) change what it does.
const benchEnvVar = "OBD_BENCH_DEVICE"

// fioJob is one fio measurement.
type fioJob struct {
	name    string
	rw      string
	bs      string
	iodepth int
	// ioSize, when set, makes the job read that much once instead of for
	// the run time ("all": the whole device), for cold measurements.
	ioSize string
}

var (
	warmJobs = []fioJob{
		{name: "rand4k-qd32", rw: "randread", bs: "4k", iodepth: 32},
		{name: "seq1m-qd4", rw: "read", bs: "1M", iodepth: 4},
	}
	coldJobs = []fioJob{
		{name: "rand4k-qd32", rw: "randread", bs: "4k", iodepth: 32, ioSize: "128M"},
		{name: "seq1m-qd4", rw: "read", bs: "1M", iodepth: 4, ioSize: "all"},
	}
)

// fioResult is a job's read IOPS and bytes per second.
type fioResult struct {
	iops, bw float64
}

func runFio(b *testing.B, dev string, j fioJob, runtime int) fioResult {
	b.Helper()
	args := []string{"--name=" + j.name, "--filename=" + dev, "--readonly", "--rw=" + j.rw, "--bs=" + j.bs,
		"--iodepth=" + strconv.Itoa(j.iodepth), "--ioengine=libaio", "--direct=1", "--numjobs=1",
		"--randrepeat=0", "--output-format=json"}
	switch j.ioSize {
	case "":
		args = append(args, "--time_based", "--runtime="+strconv.Itoa(runtime))
	case "all":
	default:
		args = append(args, "--io_size="+j.ioSize)
	}
	out, err := exec.Command("fio", args...).Output()
	if err != nil {
		b.Fatalf("fio %s on %s: %v\n%s", j.name, dev, err, out)
	}
	var res struct {
		Jobs []struct {
			Read struct {
				IOPS    float64 `json:"iops"`
				BWBytes float64 `json:"bw_bytes"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) != 1 {
		b.Fatalf("fio output: %v (%d jobs)\n%s", err, len(res.Jobs), out)
	}
	return fioResult{iops: res.Jobs[0].Read.IOPS, bw: res.Jobs[0].Read.BWBytes}
}

// warm reads the whole device once, so the caches under it hold the image.
func warm(b *testing.B, dev string) {
	b.Helper()
	out, err := exec.Command("fio", "--name=warm", "--filename="+dev, "--readonly", "--rw=read",
		"--bs=1M", "--iodepth=8", "--ioengine=libaio", "--direct=1", "--output-format=terse").CombinedOutput()
	if err != nil {
		b.Fatalf("warm-up of %s: %v\n%s", dev, err, out)
	}
}

func envInt(b *testing.B, name string, def int64) int64 {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil || n <= 0 {
		b.Fatalf("%s=%q: want a positive integer", name, v)
	}
	return n
}

// benchVariant is a device configuration the benchmark measures.
type benchVariant struct {
	name           string
	tuning         *Tuning // nil: a plain loop device over the file, of plainBlockSize
	plainBlockSize uint32
	local          bool // serve a FileImage (passthrough may apply), else a plain io.ReaderAt
	// switchFile moves the device onto the local file before measuring.
	switchFile bool
}

func benchVariants() []benchVariant {
	tun := func(f func(*Tuning)) *Tuning {
		t := DefaultTuning()
		f(&t)
		return &t
	}
	naive := &Tuning{CacheTimeout: time.Second, MaxRead: 128 << 10}
	return []benchVariant{
		{name: "plain-loop-bs4096", plainBlockSize: 4096},
		{name: "naive-go-fuse", tuning: naive},
		{name: "naive-loop-dio", tuning: tun(func(t *Tuning) { *t = *naive; t.LoopDirectIO = true })},
		{name: "default", tuning: tun(func(*Tuning) {})},
		{name: "no-keep-cache", tuning: tun(func(t *Tuning) { t.KeepCache, t.CacheTimeout = false, time.Second })},
		{name: "loop-dio", tuning: tun(func(t *Tuning) { t.LoopDirectIO = true })},
		{name: "bs512", tuning: tun(func(t *Tuning) { t.LoopBlockSize = 512 })},
		{name: "max-read-128k", tuning: tun(func(t *Tuning) { t.MaxRead = 128 << 10 })},
		{name: "readahead-1m", tuning: tun(func(t *Tuning) { t.ReadAhead = 1 << 20 })}, // the default until 2026-11-23
		{name: "readahead-4m", tuning: tun(func(t *Tuning) { t.ReadAhead = 4 << 20 })},
		{name: "sync-read", tuning: tun(func(t *Tuning) { t.SyncRead = true })},
		{name: "sync-read-loop-dio", tuning: tun(func(t *Tuning) { t.SyncRead, t.LoopDirectIO = true, true })},
		{name: "local-no-passthrough", tuning: tun(func(t *Tuning) { t.Passthrough = false }), local: true},
		{name: "local-passthrough", tuning: tun(func(*Tuning) {}), local: true},
		{name: "local-passthrough-dio", tuning: tun(func(t *Tuning) { t.LoopDirectIO = true }), local: true},
		{name: "switched", tuning: tun(func(*Tuning) {}), switchFile: true},
		{name: "switched-dio", tuning: tun(func(t *Tuning) { t.SwitchDirectIO = true }), switchFile: true},
	}
}

// BenchmarkDevice measures fio 4k random reads at queue depth 32 and 1 MiB
// sequential reads, warm, on each variant. The machine is shared, so each
// variant's run is paired with a run on the plain loop device (the
// baseline) just before it, rounds times over; "x-base" is the median of
// the per-round ratios (x-min and x-max their range), "x-best" the ratio
// of the best runs, iops and MiB/s are the variant's medians. The image
// file and, for variants reading through the FUSE page cache, the FUSE
// file are locked in memory, so warm stays warm.
func BenchmarkDevice(b *testing.B) {
	e := newBenchEnv(b)
	for _, v := range benchVariants() {
		if e.only.MatchString(v.name) {
			b.Run(v.name, func(b *testing.B) { e.measure(b, v, warmJobs, false) })
		}
	}
}

// BenchmarkDeviceCold is BenchmarkDevice with the FUSE file's page cache
// dropped before each run of a variant, so its reads reach the daemon
// (which reads the local file from the page cache). The baseline stays
// warm: the ratio is what a cold FUSE cache costs against a warm disk.
func BenchmarkDeviceCold(b *testing.B) {
	e := newBenchEnv(b)
	for _, v := range benchVariants() {
		if v.tuning != nil && !v.local && !v.switchFile && e.only.MatchString(v.name) {
			b.Run(v.name, func(b *testing.B) { e.measure(b, v, coldJobs, true) })
		}
	}
}

// benchEnv is what the device benchmarks share: the random image file
// and the baseline loop device over it.
type benchEnv struct {
	f               *os.File
	path            string
	size            int64
	baseDev         string
	runtime, rounds int
	only            *regexp.Regexp
}

func newBenchEnv(b *testing.B) *benchEnv {
	if os.Getenv(benchEnvVar) != "1" {
		b.Skipf("set %s=1 to run the device benchmarks (minutes, 1 GiB of disk)", benchEnvVar)
	}
	needKernel(b)
	needTool(b, "fio")
	e := &benchEnv{
		size:    envInt(b, "OBD_BENCH_SIZE", 1<<30),
		runtime: int(envInt(b, "OBD_BENCH_RUNTIME", 2)),
		rounds:  int(envInt(b, "OBD_BENCH_ROUNDS", 5)),
	}
	var err error
	if e.only, err = regexp.Compile(os.Getenv("OBD_BENCH_VARIANTS")); err != nil {
		b.Fatalf("OBD_BENCH_VARIANTS: %v", err)
	}
	e.path = randomFile(b, e.size)
	if e.f, err = os.Open(e.path); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.f.Close() })
	e.baseDev = e.device(b, benchVariant{name: "baseline", plainBlockSize: 512}).path
	warm(b, e.baseDev)
	// This machine's DAMON pages out file data idle for 30 s; pinned pages
	// keep "warm" meaning warm for the whole run.
	pin(b, e.path)
	return e
}

// measure runs jobs on variant v paired with the baseline; cold drops the
// variant's FUSE cache before each of its runs.
func (e *benchEnv) measure(b *testing.B, v benchVariant, jobs []fioJob, cold bool) {
	d := e.device(b, v)
	dev := d.path
	warm(b, dev)
	if !cold && d.fuseFile != "" && !v.tuning.LoopDirectIO && !(v.local && v.tuning.Passthrough) {
		pin(b, d.fuseFile) // the variant reads through the FUSE page cache
	}
	for _, j := range jobs {
		b.Run(j.name, func(b *testing.B) {
			var ratios, iops, bws, baseIOPS []float64
			for b.Loop() {
				for range e.rounds {
					base := runFio(b, e.baseDev, j, e.runtime)
					baseIOPS = append(baseIOPS, base.iops)
					if cold {
						d.drop()
					}
					r := runFio(b, dev, j, e.runtime)
					b.Logf("round: baseline %.0f iops, %s %.0f iops, ratio %.2f", base.iops, v.name, r.iops, r.iops/base.iops)
					ratios = append(ratios, r.iops/base.iops)
					iops = append(iops, r.iops)
					bws = append(bws, r.bw)
				}
			}
			b.ReportMetric(median(iops), "iops")
			b.ReportMetric(median(bws)/(1<<20), "MiB/s")
			b.ReportMetric(median(ratios), "x-base")
			b.ReportMetric(slices.Min(ratios), "x-min")
			b.ReportMetric(slices.Max(ratios), "x-max")
			// Other work on the machine only ever slows a run down, so the
			// best runs of each side estimate their uncontended speeds.
			b.ReportMetric(slices.Max(iops)/slices.Max(baseIOPS), "x-best")
		})
	}
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

// benchDev is an attached variant.
type benchDev struct {
	path     string
	fuseFile string // the FUSE image file, "" for a plain loop or a switched device
	drop     func() // drops the FUSE file's page cache
}

// device attaches a variant; it is torn down at the end of b.
func (e *benchEnv) device(b *testing.B, v benchVariant) benchDev {
	b.Helper()
	ctx := context.Background()
	if v.tuning == nil {
		l, err := attachLoop(ctx, e.f, loopConfig{readOnly: true, blockSize: v.plainBlockSize})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { l.detach(ctx) })
		return benchDev{path: l.path, drop: func() {}}
	}
	var img Image = NewImage(e.f, e.size)
	if v.local {
		fi, err := OpenFileImage(e.path)
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { fi.Close() })
		img = fi
	}
	dir := filepath.Join(b.TempDir(), "fuse")
	d, err := FUSELoop{}.Attach(ctx, img, Options{Tuning: v.tuning, MountDir: dir})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		if err := d.Close(); err != nil {
			b.Errorf("Close: %v", err)
		}
	})
	if v.switchFile {
		warm(b, d.Path())
		if err := d.SwitchToFile(ctx, e.path); err != nil {
			b.Fatal(err)
		}
		return benchDev{path: d.Path(), drop: func() {}}
	}
	drop := func() {
		f, err := os.Open(filepath.Join(dir, imageFileName))
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			b.Fatal(err)
		}
	}
	return benchDev{path: d.Path(), fuseFile: filepath.Join(dir, imageFileName), drop: drop}
}

// randomFile writes size random bytes to a file that stays in the page
// cache for the run.
func randomFile(b *testing.B, size int64) string {
	b.Helper()
	path := filepath.Join(b.TempDir(), "random.img")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyN(f, rand.Reader, size); err != nil {
		b.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	fmt.Fprintf(os.Stderr, "benchmark image: %s, %d bytes\n", path, size)
	return path
}

// pin maps path and locks it in memory until the end of b, so the page
// cache keeps all of it.
func pin(b *testing.B, path string) {
	b.Helper()
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		b.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, int(st.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		b.Fatalf("mmap %s: %v", path, err)
	}
	if err := unix.Mlock(m); err != nil {
		unix.Munmap(m)
		b.Fatalf("mlock %s: %v", path, err)
	}
	b.Cleanup(func() { unix.Munmap(m) })
}
