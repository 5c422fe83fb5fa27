package snapshotter

import (
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
