package convert

import (
	"archive/tar"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// leftovers lists mounts and loop devices that involve dir.
func leftovers(dir string) []string {
	var found []string
	mounts, _ := os.ReadFile("/proc/self/mountinfo")
	for _, l := range strings.Split(string(mounts), "\n") {
		if strings.Contains(l, dir) {
			found = append(found, "mount: "+l)
		}
	}
	files, _ := filepath.Glob("/sys/block/loop*/loop/backing_file")
	for _, f := range files {
		if b, err := os.ReadFile(f); err == nil && strings.Contains(string(b), dir) {
			found = append(found, "loop: "+f+" -> "+strings.TrimSpace(string(b)))
		}
	}
	return found
}

// TestFailuresCleanUp makes conversions fail inside the mounted
// filesystem (a tar that does not match its diff_id, a truncated blob) and
// checks the error and that no mount, loop device or work file is left.
func TestFailuresCleanUp(t *testing.T) {
	needKernel(t)
	dir := t.TempDir()
	small := filepath.Join(dir, "small.tar")
	writeTar(t, small, []tarEntry{
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/file", Mode: 0o644}, data: []byte(strings.Repeat("x", 100000))},
	})
	cases := map[string]struct {
		edit    func(*ocispec.Image)
		corrupt func(layout string)
		want    error
	}{
		"wrong diff_id": {
			edit: func(img *ocispec.Image) { img.RootFS.DiffIDs[0] = digest.FromString("not this tar") },
			want: ErrDigest,
		},
		"truncated blob": {
			corrupt: func(layout string) {
				var m ocispec.Manifest
				var x ocispec.Index
				readJSONFile(t, filepath.Join(layout, "index.json"), &x)
				readJSONFile(t, blobFile(layout, x.Manifests[0]), &m)
				p := blobFile(layout, m.Layers[0])
				if err := os.Truncate(p, m.Layers[0].Size/2); err != nil {
					t.Fatal(err)
				}
			},
			want: ErrInvalidImage,
		},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			layout := filepath.Join(t.TempDir(), "src")
			writeTestLayout(t, layout, "img", []testLayer{{small, gzipped}}, tc.edit)
			if tc.corrupt != nil {
				tc.corrupt(layout)
			}
			work := t.TempDir()
			c := newTestConverter(t, "", func(o *Options) { o.WorkDir = work })
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_, err := c.Convert(ctx, "oci:"+layout+":img", "oci:"+t.TempDir()+":img")
			if !errors.Is(err, tc.want) {
				t.Errorf("Convert: %v, want %v", err, tc.want)
			}
			if l := leftovers(work); len(l) > 0 {
				t.Errorf("left behind:\n%s", strings.Join(l, "\n"))
			}
			if ents, _ := os.ReadDir(work); len(ents) > 0 {
				t.Errorf("work directory not emptied: %d entries left", len(ents))
			}
		})
	}
}
