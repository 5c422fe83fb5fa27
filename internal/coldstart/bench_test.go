package coldstart

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/rs/zerolog"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/internal/testutil"
	"github.com/obdtrace/obdtrace/internal/testutil/registry"
	"github.com/obdtrace/obdtrace/internal/testutil/testdata"
	"github.com/obdtrace/obdtrace/internal/wanproxy"
)

// The link: 25 Mbit/s, 40 ms round trip.
var link = wanproxy.Options{BytesPerSecond: 25_000_000 / 8, RTT: 40 * time.Millisecond}

// pythonImports is the start-up of a Python application: the interpreter,
// numpy (with its BLAS/LAPACK shared libraries) and a set of standard
// modules an application server imports.
const pythonImports = `import numpy, json, email.parser, http.client, sqlite3, urllib.request, logging, decimal, ` +
	`asyncio, xml.etree.ElementTree, csv, hashlib, ssl, argparse, subprocess, datetime, uuid; ` +
	`c = sqlite3.connect(":memory:"); c.execute("create table t (x)"); ` +
	`print("ok", numpy.__version__, int(numpy.arange(1000).sum()), json.dumps({"n": c.execute("select count(*) from t").fetchone()[0]}))`

// djangoApp is the start-up of a web application: Django with the admin,
// auth, sessions, messages and static files apps, set up, then answering
// its first request (the admin login page, rendered from templates) through
// its WSGI handler. Some 600 modules, most of them small files.
const djangoApp = `import sys
from django.conf import settings
settings.configure(
    DEBUG=False, ALLOWED_HOSTS=["*"], SECRET_KEY="obdtrace-coldstart", ROOT_URLCONF=__name__,
    INSTALLED_APPS=["django.contrib.admin", "django.contrib.auth", "django.contrib.contenttypes",
                    "django.contrib.sessions", "django.contrib.messages", "django.contrib.staticfiles"],
    MIDDLEWARE=["django.middleware.security.SecurityMiddleware", "django.contrib.sessions.middleware.SessionMiddleware",
                "django.middleware.common.CommonMiddleware", "django.middleware.csrf.CsrfViewMiddleware",
                "django.contrib.auth.middleware.AuthenticationMiddleware", "django.contrib.messages.middleware.MessageMiddleware"],
    SESSION_ENGINE="django.contrib.sessions.backends.signed_cookies",
    MESSAGE_STORAGE="django.contrib.messages.storage.cookie.CookieStorage",
    DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
    TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
                "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                    "django.contrib.auth.context_processors.auth", "django.contrib.messages.context_processors.messages"]}}],
    STATIC_URL="/static/", USE_TZ=True)
import django
django.setup()
from django.contrib import admin
from django.urls import path
urlpatterns = [path("admin/", admin.site.urls)]
from django.core.wsgi import get_wsgi_application
from wsgiref.util import setup_testing_defaults
env = {"PATH_INFO": "/admin/login/", "REQUEST_METHOD": "GET", "wsgi.errors": sys.stderr}
setup_testing_defaults(env)
got = []
body = b"".join(get_wsgi_application()(env, lambda status, headers: got.append(status)))
assert got[0].startswith("200"), got
assert b"csrfmiddlewaretoken" in body, body[:200]
print("ok", got[0], len(body), len(sys.modules))
`

const helloSHA256 = "d3f7d10e296e5c626ea78539cb38cd8dffd043bea3627da35ce3b20c0ac68014"

// BenchmarkColdStart runs the four variants on the hello-world image and
// on the python3 + numpy and python3 + Django images (built by
// scripts/bench-coldstart.sh), each
// for OBDTRACE_COLDSTART_ROUNDS rounds (default 3) within one iteration:
// run it with -benchtime 1x and OBDTRACE_COLDSTART=1. With OBDTRACE_COLDSTART_OUT set, the table
// and chart of each image are written there.
func BenchmarkColdStart(b *testing.B) {
	if os.Getenv("OBDTRACE_COLDSTART") != "1" {
		b.Skip("takes minutes: set OBDTRACE_COLDSTART=1 (scripts/bench-coldstart.sh does)")
	}
	testutil.RequireRoot(b, "loop devices, FUSE, mount, eBPF, chroot")
	b.Run("hello-world", func(b *testing.B) {
		reg := registry.Start(b, registry.Options{})
		ref := reg.PushHelloWorld(b)
		runBench(b, "hello-world", Config{Ref: ref, Upstream: "http://" + reg.Host, Baselayer: testdata.Baselayer(b), Workload: readHello})
	})
	// Each rootfs converted twice: upstream's LZ4 in 4 KiB blocks, and zstd
	// in 64 KiB blocks (0.67x the bytes).
	for _, img := range []struct {
		name string
		work Workload
	}{
		{"python3-numpy", python(pythonImports)},
		{"python3-numpy-zstd", python(pythonImports)},
		{"python3-django", python(djangoApp)},
		{"python3-django-zstd", python(djangoApp)},
	} {
		b.Run(img.name, func(b *testing.B) { benchImage(b, img.name, img.work) })
	}
}

// benchImage pushes the converted image layout NAME-obd, from the
// directory OBDTRACE_COLDSTART_CACHE (default /var/cache/obdtrace/testdata),
// to a local registry and runs work on it.
func benchImage(b *testing.B, name string, work Workload) {
	cache := os.Getenv("OBDTRACE_COLDSTART_CACHE")
	if cache == "" {
		cache = "/var/cache/obdtrace/testdata"
	}
	layout := filepath.Join(cache, name+"-obd")
	if _, err := os.Stat(filepath.Join(layout, "index.json")); err != nil {
		testutil.Missing(b, "no converted image at %s: run scripts/bench-coldstart.sh --build-image", layout)
	}
	reg := registry.Start(b, registry.Options{})
	reg.PushRef(b, layout, "obd", name+":obd")
	runBench(b, name, Config{Ref: reg.Host + "/" + name + ":obd", Upstream: "http://" + reg.Host, Workload: work})
}

func runBench(b *testing.B, name string, cfg Config) {
	cfg.Link, cfg.Rounds, cfg.Work = link, int(envInt(b, "OBDTRACE_COLDSTART_ROUNDS", 3)), b.TempDir()
	logf, err := os.Create(filepath.Join(cfg.Work, "serve.log"))
	if err != nil {
		b.Fatal(err)
	}
	defer logf.Close()
	cfg.Logger = zerolog.New(logf).Level(zerolog.WarnLevel)
	if path := os.Getenv("OBDTRACE_COLDSTART_LOG"); path != "" { // debug records with µs times: where a start's time goes
		f, err := os.Create(path)
		if err != nil {
			b.Fatal(err)
		}
		defer f.Close()
		cfg.Logger = zerolog.New(f).Level(zerolog.DebugLevel).Hook(zerolog.HookFunc(func(e *zerolog.Event, _ zerolog.Level, _ string) {
			e.Int64("t_us", time.Now().UnixMicro())
		}))
		cfg.Link.Logger = cfg.Logger // each request through the proxy
	}
	cfg.RefillSize = envInt(b, "OBDTRACE_COLDSTART_REFILL", 0)
	cfg.BlockSize = envInt(b, "OBDTRACE_COLDSTART_BLOCK", 0)
	cfg.DeviceReadAhead = int(envInt(b, "OBDTRACE_COLDSTART_DEVICE_RA", 0))
	cfg.Trace = os.Getenv("OBDTRACE_COLDSTART_TRACE_DIR")
	if cfg.Trace != "" { // one trace per image, kept across runs
		if err := os.MkdirAll(cfg.Trace, 0o755); err != nil {
			b.Fatal(err)
		}
		cfg.Trace = filepath.Join(cfg.Trace, name+".trace.pb")
	}
	cfg.Replay.Workers = int(envInt(b, "OBDTRACE_COLDSTART_WORKERS", 0))
	cfg.Replay.MergeSize = envInt(b, "OBDTRACE_COLDSTART_MERGE", 0)
	if s := os.Getenv("OBDTRACE_COLDSTART_MERGE_GAP"); s != "" { // -1: ranges join only when they touch
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			b.Fatalf("OBDTRACE_COLDSTART_MERGE_GAP=%q: want an integer", s)
		}
		cfg.Replay.MergeGap = n
	}
	if s := os.Getenv("OBDTRACE_COLDSTART_VARIANTS"); s != "" { // e.g. "0,1": no prefetch and replay only
		for _, f := range strings.Split(s, ",") {
			n, err := strconv.Atoi(f)
			if err != nil || n < 0 || n >= int(numVariants) {
				b.Fatalf("OBDTRACE_COLDSTART_VARIANTS=%q: want indexes 0-3", s)
			}
			cfg.Variants = append(cfg.Variants, Variant(n))
		}
	}
	cfg.Progress = func(s Sample) {
		b.Logf("%s round %d %-13s %6.2f s  %6.1f MB  %4d requests  demand %d (p99 %v)  prefetch hits %d late %d, %.1f MB (%.1f unused)  readahead %.1f MB (%.1f unused)  plan blocks %.1f MB, demand of them %.2f MB (%d fetches), unplanned %.2f MB",
			name, s.Round, s.Variant, s.Start.Seconds(), float64(s.LinkBytes)/1e6, s.Requests,
			s.Cache.DemandFetches, s.Cache.DemandP99.Round(time.Millisecond), s.Cache.PrefetchHits, s.Cache.PrefetchLate,
			float64(s.Cache.PrefetchedByte)/1e6, float64(s.Cache.PrefetchUnused)/1e6,
			float64(s.Cache.ReadaheadBytes)/1e6, float64(s.Cache.ReadaheadUnused)/1e6,
			float64(s.Cache.Planned)/1e6, float64(s.Cache.DemandPlanned)/1e6, s.Cache.DemandPlannedFetches, float64(s.Cache.DemandUnplanned)/1e6)
	}
	var res *Result
	for range b.N {
		var err error
		if res, err = Run(context.Background(), cfg); err != nil {
			b.Fatal(err)
		}
	}
	sum := res.Summarize()
	for _, v := range Variants {
		unit := strings.ReplaceAll(v.String(), " ", "-")
		b.ReportMetric(sum[v].Start.Seconds(), "s/"+unit)
		b.ReportMetric(float64(sum[v].LinkBytes)/1e6, "MB/"+unit)
	}
	c := res.Check()
	b.ReportMetric(c.Speedup, "speedup")
	b.ReportMetric(c.BoundRatio, "x-bound")
	b.ReportMetric(c.DemandRatio, "x-demand-p99")
	var md bytes.Buffer
	if err := res.WriteMarkdown(&md, name); err != nil {
		b.Fatal(err)
	}
	b.Logf("\n%s", md.String())
	if out := os.Getenv("OBDTRACE_COLDSTART_OUT"); out != "" {
		writeOut(b, out, name, res, md.Bytes())
	}
}

func writeOut(b *testing.B, dir, name string, res *Result, md []byte) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		b.Fatal(err)
	}
	if err := atomicfile.Write(filepath.Join(dir, "coldstart-"+name+".md"), md, 0o644); err != nil {
		b.Fatal(err)
	}
	var png bytes.Buffer
	title := fmt.Sprintf("Cold start, %s, %s / %v RTT: median of %d rounds", name, rateString(res.Link.BytesPerSecond), res.Link.RTT, len(res.Samples)/int(numVariants))
	if err := WriteChart(&png, title, res.Summarize()); err != nil {
		b.Fatal(err)
	}
	if err := atomicfile.Write(filepath.Join(dir, "coldstart-"+name+".png"), png.Bytes(), 0o644); err != nil {
		b.Fatal(err)
	}
}

// envInt reads a non-negative integer setting from the environment.
func envInt(b *testing.B, name string, def int64) int64 {
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 {
		b.Fatalf("%s=%q: want a non-negative integer", name, s)
	}
	return n
}

// readHello reads /hello, the whole start-up of the hello-world image.
func readHello(_ context.Context, root string) error {
	data, err := os.ReadFile(filepath.Join(root, "hello"))
	if err != nil {
		return fmt.Errorf("%w: %w", ErrWorkload, err)
	}
	if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != helloSHA256 {
		return fmt.Errorf("%w: /hello has sha256 %x", ErrWorkload, sum)
	}
	return nil
}

// python returns a workload that runs program with python3 in a chroot of
// the image; the program prints "ok ..." when it did its work.
func python(program string) Workload {
	return func(ctx context.Context, root string) error {
		cmd := exec.CommandContext(ctx, "chroot", root, "/usr/bin/python3", "-c", program)
		cmd.Env = []string{"PATH=/usr/local/bin:/usr/bin:/bin", "HOME=/root", "LANG=C.UTF-8"}
		out, err := cmd.CombinedOutput()
		if err != nil || !bytes.HasPrefix(out, []byte("ok ")) {
			return fmt.Errorf("%w: python3: %v: %s", ErrWorkload, err, out)
		}
		return nil
	}
}
