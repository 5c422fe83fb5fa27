// Package registry runs a real OCI registry (Debian's docker-registry, the
// distribution v2 server) on 127.0.0.1 for tests, optionally behind htpasswd
// basic auth or bearer-token auth, and pushes the upstream overlaybd test
// images into it. It is test support: every helper takes a testing.TB and
// fails or skips the test itself.
//
// Missing tools (docker-registry, skopeo) fail the test under CI=true and
// skip it otherwise (testutil.RequireTool).
package registry

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/bcrypt"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// Binary is the registry server executable Start runs.
const Binary = "docker-registry"

// Options selects how the registry authenticates clients. The zero value is
// an anonymous registry.
type Options struct {
	// BasicAuth, when it has entries, enables htpasswd basic auth with these
	// user -> password pairs.
	BasicAuth map[string]string
	// TokenAuth, when it has entries, enables bearer-token auth: a token
	// server started in the test process issues tokens to these
	// user -> password pairs (and to anonymous clients, with no access).
	TokenAuth map[string]string
}

// Server is a running registry. Host is its "127.0.0.1:port" address, the
// host part of image references that point at it.
type Server struct {
	Host string
	// User and Password are one valid credential when auth is enabled.
	User, Password string

	dir string
}

// Start runs a registry with storage in a fresh temporary directory and stops
// it (by the PID it started) when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	bin := testutil.RequireTool(t, Binary)
	s := &Server{dir: t.TempDir()}
	authCfg := s.authConfig(t, opts)
	var lastErr error
	// The free port is found by binding and releasing it, so another process
	// can take it in between; a couple of attempts make that race harmless.
	for attempt := 0; attempt < 3; attempt++ {
		addr, err := freeAddr()
		if err != nil {
			t.Fatalf("find a free port: %v", err)
		}
		if lastErr = s.run(t, bin, addr, authCfg); lastErr == nil {
			s.Host = addr
			return s
		}
	}
	t.Fatalf("start %s: %v", Binary, lastErr)
	return nil
}

func (s *Server) authConfig(t testing.TB, opts Options) string {
	t.Helper()
	switch {
	case len(opts.BasicAuth) > 0 && len(opts.TokenAuth) > 0:
		t.Fatal("registry: BasicAuth and TokenAuth are mutually exclusive")
	case len(opts.BasicAuth) > 0:
		var htpasswd bytes.Buffer
		for user, pass := range opts.BasicAuth {
			// MinCost keeps the test fast; the registry accepts any bcrypt cost.
			h, err := bcrypt.GenerateFromPassword([]byte(pass), bcrypt.MinCost)
			if err != nil {
				t.Fatalf("bcrypt: %v", err)
			}
			fmt.Fprintf(&htpasswd, "%s:%s\n", user, h)
			s.User, s.Password = user, pass
		}
		path := filepath.Join(s.dir, "htpasswd")
		if err := os.WriteFile(path, htpasswd.Bytes(), 0o600); err != nil {
			t.Fatal(err)
		}
		return fmt.Sprintf("auth:\n  htpasswd:\n    realm: obdtrace-test\n    path: %s\n", path)
	case len(opts.TokenAuth) > 0:
		for user, pass := range opts.TokenAuth {
			s.User, s.Password = user, pass
		}
		ts := startTokenServer(t, s.dir, opts.TokenAuth)
		return fmt.Sprintf("auth:\n  token:\n    realm: %s\n    service: %s\n    issuer: %s\n    rootcertbundle: %s\n",
			ts.realm, tokenService, tokenIssuer, ts.certPath)
	}
	return ""
}

// run starts the server on addr and waits until it answers /v2/.
func (s *Server) run(t testing.TB, bin, addr, authCfg string) error {
	t.Helper()
	storage := filepath.Join(s.dir, "storage")
	cfg := fmt.Sprintf(`version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: %s
  delete:
    enabled: true
http:
  addr: %s
%s`, storage, addr, authCfg)
	cfgPath := filepath.Join(s.dir, "config.yml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		return err
	}
	logPath := filepath.Join(s.dir, "registry.log")
	logFile, err := os.Create(logPath)
	if err != nil {
		return err
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "serve", cfgPath)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	if err := cmd.Start(); err != nil {
		return err
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop := func() {
		_ = cmd.Process.Kill()
		<-exited
	}
	if err := waitReady(addr, exited); err != nil {
		stop()
		out, _ := os.ReadFile(logPath)
		return fmt.Errorf("%w; registry log:\n%s", err, out)
	}
	t.Cleanup(stop)
	return nil
}

func waitReady(addr string, exited <-chan error) error {
	client := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-exited:
			return fmt.Errorf("registry exited early: %v", err)
		default:
		}
		resp, err := client.Get("http://" + addr + "/v2/")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK || resp.StatusCode == http.StatusUnauthorized {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return errors.New("registry did not answer /v2/ within 15s")
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// Testdata returns the directory of the shared upstream overlaybd test
// vectors (../shared/testdata/overlaybd beside the repository root).
func Testdata(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	for {
		if mod, err := os.ReadFile(filepath.Join(dir, "go.mod")); err == nil &&
			strings.Contains(string(mod), "module github.com/obdtrace/obdtrace\n") {
			break
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatal("repository root (go.mod of github.com/obdtrace/obdtrace) not found above the working directory")
		}
		dir = parent
	}
	td := filepath.Join(dir, "..", "shared", "testdata", "overlaybd")
	if _, err := os.Stat(td); err != nil {
		t.Fatalf("shared test vectors missing: %v", err)
	}
	return td
}

// HelloWorldOCI is the OCI layout holding docker hello-world and its
// upstream overlaybd conversion (ref "amd64-converted").
func HelloWorldOCI(t testing.TB) string {
	t.Helper()
	return filepath.Join(Testdata(t), "aci-hello-world-oci")
}

// BlobPath is the path of a blob inside an OCI layout.
func BlobPath(layout string, dgst string) string {
	alg, hex, _ := strings.Cut(dgst, ":")
	return filepath.Join(layout, "blobs", alg, hex)
}
