package image

import (
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// The hello-world image's documents, as upstream's converter and docker wrote them.
const (
	ociManifest    = `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:b67b1f1224de620e9a932ab7ff0e819d7dd9d236605dd8027e5ecf2df650e65e","size":584},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d","size":642560,"annotations":{"containerd.io/snapshot/overlaybd/blob-digest":"sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d","containerd.io/snapshot/overlaybd/blob-size":"642560","containerd.io/snapshot/overlaybd/version":"0.1.0"}}]}`
	ociConfig      = `{"created":"2023-05-04T17:37:03.872958712Z","architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/hello"]},"rootfs":{"type":"layers","diff_ids":["sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"]},"history":[{"created":"2023-05-04T17:37:03.801840823Z","created_by":"/bin/sh -c #(nop) COPY file:201f8f1849e89d53be9f6aa76937f5e209d745abfd15a8552fcf2ba45ab267f9 in / "},{"created":"2023-05-04T17:37:03.872958712Z","created_by":"/bin/sh -c #(nop)  CMD [\"/hello\"]","empty_layer":true}]}`
	dockerManifest = `{
   "schemaVersion": 2,
   "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
   "config": {
      "mediaType": "application/vnd.docker.container.image.v1+json",
      "size": 1470,
      "digest": "sha256:9c7a54a9a43cca047013b82af109fe963fde787f63f9e016fdc3384500c2823d"
   },
   "layers": [
      {
         "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
         "size": 2457,
         "digest": "sha256:719385e32844401d57ecfd3eacab360bf551a1491c05b85806ed8f1b08d792f6"
      }
   ]
}`
	dockerConfig = `{"architecture":"amd64","config":{"Env":["PATH=/bin"],"Cmd":["/hello"]},"container_config":{"Cmd":["/bin/sh","-c","a && b <c>"]},"created":"2023-05-04T11:46:35.356328888Z","history":[{"created":"2023-05-04T11:46:35.27781596Z","created_by":"/bin/sh -c #(nop) COPY file:x in / "},{"created":"2023-05-04T11:46:35.356328888Z","created_by":"/bin/sh -c #(nop)  CMD [\"/hello\"]","empty_layer":true}],"os":"linux","rootfs":{"type":"layers","diff_ids":["sha256:c8d6fe9d9f8fb6ab6e0d701141d358a8bc40b1d5c46cbdc6fd445371c895b1f6"]}}`
)

type testConfig struct {
	RootFS struct {
		Type    string          `json:"type"`
		DiffIDs []digest.Digest `json:"diff_ids"`
	} `json:"rootfs"`
	History []struct {
		Created    *time.Time `json:"created"`
		CreatedBy  string     `json:"created_by"`
		EmptyLayer bool       `json:"empty_layer"`
	} `json:"history"`
}

func decodeUpdated(t *testing.T, u *Updated) (ocispec.Manifest, testConfig) {
	t.Helper()
	var m ocispec.Manifest
	if err := json.Unmarshal(u.Manifest, &m); err != nil {
		t.Fatal(err)
	}
	var c testConfig
	if err := json.Unmarshal(u.Config, &c); err != nil {
		t.Fatal(err)
	}
	if u.ConfigDesc.Digest != digest.FromBytes(u.Config) || m.Config.Digest != u.ConfigDesc.Digest ||
		m.Config.Size != int64(len(u.Config)) || u.ManifestDesc.Digest != digest.FromBytes(u.Manifest) {
		t.Fatalf("descriptors do not match the documents: %+v %+v", u.ConfigDesc, u.ManifestDesc)
	}
	return m, c
}

func TestUpdateOCI(t *testing.T) {
	l1, _ := BuildLayer(sampleTrace(5, 1), ocispec.MediaTypeImageLayer)
	u, err := Update([]byte(ociManifest), []byte(ociConfig), l1.Desc, UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m, c := decodeUpdated(t, u)
	if u.Replaced != nil || len(m.Layers) != 2 || m.Layers[1].Digest != l1.Desc.Digest || !IsTraceLayer(m.Layers[1]) ||
		m.Layers[0].Annotations[AnnotationBlobSize] != "642560" || u.ManifestDesc.MediaType != ocispec.MediaTypeImageManifest {
		t.Fatalf("manifest %s", u.Manifest)
	}
	if len(c.RootFS.DiffIDs) != 2 || c.RootFS.DiffIDs[1] != l1.Desc.Digest || c.RootFS.Type != "layers" {
		t.Fatalf("diff_ids %v", c.RootFS.DiffIDs)
	}
	if len(c.History) != 3 || c.History[2].CreatedBy != DefaultCreatedBy || c.History[2].EmptyLayer ||
		c.History[2].Created != nil || !strings.Contains(string(u.Config), `"empty_layer":false`) {
		t.Fatalf("history %s", u.Config)
	}

	// Again on the result: the trace layer is replaced, not stacked.
	l2, _ := BuildLayer(sampleTrace(6, 2), ocispec.MediaTypeImageLayer)
	created := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	u2, err := Update(u.Manifest, u.Config, l2.Desc, UpdateOptions{Created: created, CreatedBy: "again"})
	if err != nil {
		t.Fatal(err)
	}
	m2, c2 := decodeUpdated(t, u2)
	if u2.Replaced == nil || u2.Replaced.Digest != l1.Desc.Digest {
		t.Errorf("Replaced = %v, want the first trace layer", u2.Replaced)
	}
	if len(m2.Layers) != 2 || m2.Layers[1].Digest != l2.Desc.Digest || len(c2.RootFS.DiffIDs) != 2 ||
		c2.RootFS.DiffIDs[1] != l2.Desc.Digest || c2.RootFS.DiffIDs[0] != c.RootFS.DiffIDs[0] {
		t.Fatalf("second update stacked or lost layers: %s\n%s", u2.Manifest, u2.Config)
	}
	if len(c2.History) != 3 || c2.History[2].CreatedBy != "again" || !c2.History[2].Created.Equal(created) ||
		c2.History[1].CreatedBy != c.History[1].CreatedBy {
		t.Fatalf("history %s", u2.Config)
	}

	// Same inputs, same outputs.
	u3, _ := Update([]byte(ociManifest), []byte(ociConfig), l1.Desc, UpdateOptions{})
	if u3.ManifestDesc.Digest != u.ManifestDesc.Digest {
		t.Error("the same update gave a different manifest")
	}
}

func TestUpdateDockerKeepsFields(t *testing.T) {
	l, _ := BuildLayer(sampleTrace(5, 1), MediaTypeDockerLayer)
	u, err := Update([]byte(dockerManifest), []byte(dockerConfig), l.Desc, UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if u.ManifestDesc.MediaType != MediaTypeDockerManifest || !strings.Contains(string(u.Manifest), `"mediaType":"`+MediaTypeDockerManifest) {
		t.Errorf("manifest lost its docker type: %s", u.Manifest)
	}
	if !strings.Contains(string(u.Config), `"container_config":{"Cmd":["/bin/sh","-c","a && b <c>"]}`) {
		t.Errorf("config lost or escaped an unknown field: %s", u.Config)
	}
	m, c := decodeUpdated(t, u)
	if m.Config.MediaType != MediaTypeDockerConfig || len(m.Layers) != 2 || len(c.History) != 3 {
		t.Errorf("manifest %s\nconfig %s", u.Manifest, u.Config)
	}
	ociLayer, _ := BuildLayer(sampleTrace(5, 1), ocispec.MediaTypeImageLayer)
	if _, err := Update([]byte(dockerManifest), []byte(dockerConfig), ociLayer.Desc, UpdateOptions{}); !errors.Is(err, ErrInvalid) {
		t.Errorf("OCI layer in a docker manifest: err %v, want ErrInvalid", err)
	}
}

func TestUpdateShortHistory(t *testing.T) {
	// A history without an entry per layer: the old trace layer's entry is found by its
	// created_by, so a second update still replaces it.
	cfg := strings.Replace(ociConfig, `"history":[{"created":"2023-05-04T17:37:03.801840823Z","created_by":"/bin/sh -c #(nop) COPY file:201f8f1849e89d53be9f6aa76937f5e209d745abfd15a8552fcf2ba45ab267f9 in / "},`, `"history":[`, 1)
	l1, _ := BuildLayer(sampleTrace(5, 1), ocispec.MediaTypeImageLayer)
	u, err := Update([]byte(ociManifest), []byte(cfg), l1.Desc, UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l2, _ := BuildLayer(sampleTrace(5, 2), ocispec.MediaTypeImageLayer)
	u2, err := Update(u.Manifest, u.Config, l2.Desc, UpdateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	m, c := decodeUpdated(t, u2)
	if len(m.Layers) != 2 || len(c.RootFS.DiffIDs) != 2 || len(c.History) != 2 ||
		!c.History[0].EmptyLayer || c.History[1].CreatedBy != DefaultCreatedBy {
		t.Errorf("layers %d, diff_ids %d, history %d", len(m.Layers), len(c.RootFS.DiffIDs), len(c.History))
	}
}

func TestUpdateRejects(t *testing.T) {
	l, _ := BuildLayer(sampleTrace(5, 1), ocispec.MediaTypeImageLayer)
	index := `{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[]}`
	for _, tc := range []struct {
		name, manifest, config string
		want                   error
	}{
		{"index", index, ociConfig, ErrUnsupported},
		{"docker list", strings.Replace(index, ocispec.MediaTypeImageIndex, MediaTypeDockerManifestList, 1), ociConfig, ErrUnsupported},
		{"schema 1", strings.Replace(ociManifest, `"schemaVersion":2`, `"schemaVersion":1`, 1), ociConfig, ErrInvalid},
		{"bad layer digest", strings.Replace(ociManifest, `"digest":"sha256:0222`, `"digest":"sha256:XX22`, 1), ociConfig, ErrInvalid},
		{"no config", `{"schemaVersion":2,"layers":[]}`, ociConfig, ErrInvalid},
		{"not JSON", `{`, ociConfig, ErrInvalid},
		{"diff_ids mismatch", ociManifest, strings.Replace(ociConfig, `"diff_ids":["sha256:022231c3f1af70e0cc42f0c3781eabf174cff608210585bf93fc83e16d33672d"]`, `"diff_ids":[]`, 1), ErrInvalid},
		{"rootfs type", ociManifest, strings.Replace(ociConfig, `"type":"layers"`, `"type":"x"`, 1), ErrInvalid},
		{"history not a list", ociManifest, strings.Replace(ociConfig, `"history":[`, `"history":{"a":[`, 1) + "}", ErrInvalid},
		{"huge manifest", ociManifest + strings.Repeat(" ", MaxManifestSize), ociConfig, ErrTooLarge},
	} {
		if _, err := Update([]byte(tc.manifest), []byte(tc.config), l.Desc, UpdateOptions{}); !errors.Is(err, tc.want) {
			t.Errorf("%s: err %v, want %v", tc.name, err, tc.want)
		}
	}
}
