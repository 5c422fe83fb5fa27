package image

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Update returns the manifest and config of an image whose trace layer is layer: an existing
// trace layer is dropped with its diff_id and history entry, layer is appended with its digest
// as diff_id (an uncompressed layer's diffID is its digest), and a history entry records it.
// Every other field, annotations included, is kept. layer's media type must suit the manifest
// (Manifest.TraceLayerType).
func Update(manifest, cfg []byte, layer ocispec.Descriptor, opts UpdateOptions) (*Updated, error) {
	m, err := ParseManifest(manifest)
	if err != nil {
		return nil, err
	}
	c, err := parseConfig(cfg)
	if err != nil {
		return nil, err
	}
	if len(c.diffIDs) != len(m.Layers) {
		return nil, fmt.Errorf("%w: config lists %d diff_ids for %d manifest layers", ErrInvalid, len(c.diffIDs), len(m.Layers))
	}
	if want := m.TraceLayerType(); layer.MediaType != want {
		return nil, fmt.Errorf("%w: trace layer type %q in a %q manifest, want %q", ErrInvalid, layer.MediaType, m.MediaType, want)
	}
	if err := layer.Digest.Validate(); err != nil {
		return nil, fmt.Errorf("%w: trace layer digest %q: %v", ErrInvalid, layer.Digest, err)
	}
	entry := historyEntry{CreatedBy: opts.CreatedBy}
	if entry.CreatedBy == "" {
		entry.CreatedBy = DefaultCreatedBy
	}
	u := &Updated{}
	if k := m.TraceLayer(); k >= 0 {
		old := m.Layers[k]
		u.Replaced = &old
		if h := c.historyOf(k, DefaultCreatedBy, entry.CreatedBy); h >= 0 {
			c.history = slices.Delete(c.history, h, h+1)
		}
		m.rawLayers = slices.Delete(m.rawLayers, k, k+1)
		c.diffIDs = slices.Delete(c.diffIDs, k, k+1)
	}
	rawLayer, err := marshalJSON(layer)
	if err != nil {
		return nil, err
	}
	m.rawLayers = append(m.rawLayers, rawLayer)
	c.diffIDs = append(c.diffIDs, layer.Digest)
	if !opts.Created.IsZero() {
		t := opts.Created.UTC()
		entry.Created = &t
	}
	rawEntry, err := marshalJSON(entry)
	if err != nil {
		return nil, err
	}
	c.history = append(c.history, rawEntry)

	if u.Config, err = c.marshal(); err != nil {
		return nil, err
	}
	u.ConfigDesc = m.Config
	u.ConfigDesc.Digest = digest.FromBytes(u.Config)
	u.ConfigDesc.Size = int64(len(u.Config))
	if u.Manifest, err = m.marshal(u.ConfigDesc); err != nil {
		return nil, err
	}
	u.ManifestDesc = ocispec.Descriptor{
		MediaType: m.MediaType,
		Digest:    digest.FromBytes(u.Manifest),
		Size:      int64(len(u.Manifest)),
	}
	return u, nil
}

func (c *config) marshal() ([]byte, error) {
	var err error
	if c.rootfs["diff_ids"], err = marshalJSON(c.diffIDs); err != nil {
		return nil, err
	}
	if c.fields["rootfs"], err = marshalJSON(c.rootfs); err != nil {
		return nil, err
	}
	if c.fields["history"], err = marshalJSON(c.history); err != nil {
		return nil, err
	}
	return marshalJSON(c.fields)
}

// marshal encodes the manifest with its config descriptor's digest and size set from cfg.
func (m *Manifest) marshal(cfg ocispec.Descriptor) ([]byte, error) {
	var err error
	if m.rawConfig["digest"], err = marshalJSON(cfg.Digest); err != nil {
		return nil, err
	}
	if m.rawConfig["size"], err = marshalJSON(cfg.Size); err != nil {
		return nil, err
	}
	if m.fields["config"], err = marshalJSON(m.rawConfig); err != nil {
		return nil, err
	}
	if m.fields["layers"], err = marshalJSON(m.rawLayers); err != nil {
		return nil, err
	}
	return marshalJSON(m.fields)
}

// marshalJSON is json.Marshal without HTML escaping, so shell commands in a history
// ("a && b") keep their bytes. Map keys come out sorted, hence deterministic output.
func marshalJSON(v any) ([]byte, error) {
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		return nil, fmt.Errorf("image: encode JSON: %w", err)
	}
	return bytes.TrimSuffix(buf.Bytes(), []byte("\n")), nil
}
