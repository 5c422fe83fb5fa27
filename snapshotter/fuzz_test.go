package snapshotter

import (
	"errors"
	"strings"
	"testing"

	"github.com/containerd/errdefs"
)

// FuzzLayerLabels feeds layerFromLabels what an image's annotations could
// hold: it must accept a layer only with a valid blob digest and a usable
// reference, and otherwise fail as an invalid argument, never panic.
func FuzzLayerLabels(f *testing.F) {
	f.Add(blobA, "127.0.0.1:5000/hello-world:obd", "", "", "")
	f.Add(blobA, "", "registry.example/app:v1", blobT, "yes")
	f.Add("sha256:", "a", "", "", "")
	f.Add(blobA, "UPPER/x", "", "", "")
	f.Add(blobA, "r.example/a@sha256:0000", "", "", "")
	f.Add("md5:abc", "r/a", "", "sha256:zz", "no")
	f.Add(blobA, "r.example/a:b", "", "sha512:"+string(make([]byte, 3)), "")
	f.Fuzz(func(t *testing.T, blob, ref, criRef, manifest, accel string) {
		labels := map[string]string{
			LabelBlobDigest: blob, LabelImageRef: ref, LabelCRIImageRef: criRef,
			LabelCRIManifestDigest: manifest, LabelAccelerationLayer: accel,
		}
		layer, err := layerFromLabels(labels)
		if err != nil {
			if !errdefs.IsInvalidArgument(err) {
				t.Fatalf("error %v is not an invalid argument", err)
			}
			return
		}
		if layer.Blob.Validate() != nil || layer.Ref == "" || (layer.Ref != ref && layer.Ref != criRef) {
			t.Fatalf("accepted %+v from %v", layer, labels)
		}
		if layer.Trace != (accel == "yes") {
			t.Fatalf("trace %v from %q", layer.Trace, accel)
		}
		if _, err := pinRef(layer.Ref, layer.Manifest); err != nil {
			t.Fatalf("accepted a reference that cannot be pinned: %v", err)
		}
	})
}

// FuzzMirrorConfig feeds the registry.mirrors configuration what a config
// file could hold: a bad entry must fail as ErrConfig, never panic, and an
// accepted one must name an http or https host and nothing else.
func FuzzMirrorConfig(f *testing.F) {
	f.Add("docker.io", "mirror.example:5000", "")
	f.Add("r.example:5000", "http://m.example", "")
	f.Add("docker.io", "m.example:80", "m.example:80")
	f.Add("r.example", "https://m.example/", "")
	f.Add("r.example", "ftp://m.example", "")
	f.Add("r.example", "https://u:p@m.example", "")
	f.Add("r.example", "m.example/path?q=1", "")
	f.Add("a b", "m.example", "")
	f.Add("", "m.example", "")
	f.Add("r.example", "[::1]:5000", "[::1]:5000")
	f.Add("r.example", "http://%zz", "")
	f.Add("r.example", "", "")
	f.Fuzz(func(t *testing.T, origin, mirror, insecure string) {
		mt, err := newMirrorTransport(nil, map[string][]string{origin: {mirror}}, []string{insecure}, nil)
		if err != nil {
			if !errors.Is(err, ErrConfig) {
				t.Fatalf("error %v does not wrap ErrConfig", err)
			}
			return
		}
		urls := mt.mirrors[origin]
		if len(urls) != 1 {
			t.Fatalf("mirrors of %q: %v, want the one given", origin, urls)
		}
		u := urls[0]
		if (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "" || u.User != nil || u.RawQuery != "" {
			t.Fatalf("mirror %q accepted as %#v", mirror, u)
		}
		if !strings.Contains(mirror, "://") && (u.Scheme == "http") != (mirror == insecure) {
			t.Fatalf("mirror %q (insecure %q) got scheme %s", mirror, insecure, u.Scheme)
		}
		if origin == "docker.io" && len(mt.mirrors[dockerHubHost]) != 1 {
			t.Fatalf("docker.io mirrors not used for %s", dockerHubHost)
		}
	})
}
