package registry

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/obdtrace/obdtrace/internal/testutil"
)

// Refs of the upstream test layout (see ../shared/testdata/overlaybd/README.md).
const (
	// ConvertedRef is the overlaybd-converted amd64 hello-world.
	ConvertedRef = "amd64-converted"
	// ConvertedManifest is its manifest digest.
	ConvertedManifest = "sha256:42caa56a19e082b872d43f645bb392e25c9e78bce429755bd709fac598265f88"
	// ConvertedLayer is its single overlaybd layer blob.
	ConvertedLayer = "sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"
	// DockerList is the digest of the multi-platform docker manifest list.
	DockerList = "sha256:726023f73a8fc5103fa6776d48090539042cb822531c6b751b1f6dd18cb5705d"
)

// PushRef copies the image named ref in an OCI layout to repoTag
// ("name:tag") on s with skopeo, keeping every digest and annotation.
// skopeo (1.9) reads only OCI media types from a layout; use PushIndex for the
// docker-typed multi-platform list.
func (s *Server) PushRef(t testing.TB, layout, ref, repoTag string) {
	t.Helper()
	skopeo := testutil.RequireTool(t, "skopeo")
	args := []string{"--insecure-policy", "copy", "--preserve-digests", "--dest-tls-verify=false"}
	if s.User != "" {
		args = append(args, "--dest-creds", s.User+":"+s.Password)
	}
	args = append(args, "oci:"+layout+":"+ref, "docker://"+s.Host+"/"+repoTag)
	cmd := exec.Command(skopeo, args...)
	// skopeo keeps auth and temp state under HOME; keep it out of the user's.
	cmd.Env = append(os.Environ(), "HOME="+t.TempDir(), "TMPDIR="+t.TempDir())
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("skopeo %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// PushHelloWorld pushes the converted hello-world as repo "hello-world", tag
// "obd", and returns the full reference.
func (s *Server) PushHelloWorld(t testing.TB) string {
	t.Helper()
	s.PushRef(t, HelloWorldOCI(t), ConvertedRef, "hello-world:obd")
	return s.Host + "/hello-world:obd"
}

// PushIndex pushes the index (or manifest list) with digest dgst from an OCI
// layout, every manifest it lists and their blobs, byte for byte, and tags
// the index as tag in repo. It speaks the distribution API directly because
// skopeo 1.9 cannot read docker media types from an OCI layout. Anonymous and
// basic-auth registries only.
func (s *Server) PushIndex(t testing.TB, layout, repo, dgst, tag string) {
	t.Helper()
	p := pusher{s: s, t: t, layout: layout, repo: repo, client: &http.Client{Timeout: 30 * time.Second}}
	raw := p.read(dgst)
	var idx struct {
		MediaType string `json:"mediaType"`
		Manifests []struct {
			MediaType string `json:"mediaType"`
			Digest    string `json:"digest"`
		} `json:"manifests"`
	}
	if err := json.Unmarshal(raw, &idx); err != nil {
		t.Fatalf("index %s: %v", dgst, err)
	}
	for _, m := range idx.Manifests {
		p.pushManifest(m.Digest, m.MediaType, m.Digest)
	}
	p.put("/manifests/"+tag, idx.MediaType, raw)
}

type pusher struct {
	s      *Server
	t      testing.TB
	layout string
	repo   string
	client *http.Client
}

func (p *pusher) read(dgst string) []byte {
	b, err := os.ReadFile(BlobPath(p.layout, dgst))
	if err != nil {
		p.t.Fatalf("read blob: %v", err)
	}
	return b
}

func (p *pusher) pushManifest(dgst, mediaType, ref string) {
	raw := p.read(dgst)
	var m struct {
		Config struct {
			Digest string `json:"digest"`
		} `json:"config"`
		Layers []struct {
			Digest string `json:"digest"`
		} `json:"layers"`
	}
	if err := json.Unmarshal(raw, &m); err != nil {
		p.t.Fatalf("manifest %s: %v", dgst, err)
	}
	p.pushBlob(m.Config.Digest)
	for _, l := range m.Layers {
		p.pushBlob(l.Digest)
	}
	p.put("/manifests/"+ref, mediaType, raw)
}

func (p *pusher) pushBlob(dgst string) {
	resp := p.do(http.MethodPost, "http://"+p.s.Host+"/v2/"+p.repo+"/blobs/uploads/", "", nil)
	loc := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusAccepted || loc == "" {
		p.t.Fatalf("start upload of %s: %s", dgst, resp.Status)
	}
	sep := "?"
	if strings.Contains(loc, "?") {
		sep = "&"
	}
	if !strings.HasPrefix(loc, "http") {
		loc = "http://" + p.s.Host + loc
	}
	resp = p.do(http.MethodPut, loc+sep+"digest="+dgst, "application/octet-stream", p.read(dgst))
	if resp.StatusCode != http.StatusCreated {
		p.t.Fatalf("upload %s: %s", dgst, resp.Status)
	}
}

func (p *pusher) put(path, mediaType string, body []byte) {
	resp := p.do(http.MethodPut, "http://"+p.s.Host+"/v2/"+p.repo+path, mediaType, body)
	if resp.StatusCode != http.StatusCreated {
		p.t.Fatalf("PUT %s: %s", path, resp.Status)
	}
}

// do sends one request and returns the response with its body drained.
func (p *pusher) do(method, url, contentType string, body []byte) *http.Response {
	req, err := http.NewRequest(method, url, bytes.NewReader(body))
	if err != nil {
		p.t.Fatal(err)
	}
	if contentType != "" {
		req.Header.Set("Content-Type", contentType)
	}
	if p.s.User != "" {
		req.SetBasicAuth(p.s.User, p.s.Password)
	}
	resp, err := p.client.Do(req)
	if err != nil {
		p.t.Fatalf("%s %s: %v", method, url, err)
	}
	msg, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode >= 300 {
		p.t.Logf("%s %s: %s: %s", method, url, resp.Status, msg)
	}
	return resp
}

// String makes failures name the registry.
func (s *Server) String() string { return fmt.Sprintf("registry %s", s.Host) }
