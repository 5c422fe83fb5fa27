package image

import (
	"bytes"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Size limits on documents read. Registries cap manifests at 4 MiB; a config is a few KiB.
const (
	MaxManifestSize = 4 << 20
	MaxConfigSize   = 16 << 20
)

// DefaultCreatedBy is the created_by of the trace layer's history entry.
const DefaultCreatedBy = "obd-recorder trace layer"

// Manifest is a parsed image manifest (OCI or docker schema 2). It keeps the document's JSON
// objects so that Update rewrites only what it must.
type Manifest struct {
	// MediaType is the manifest's own type, from its mediaType field or, when absent, implied
	// by the config's type.
	MediaType string
	Config    ocispec.Descriptor
	Layers    []ocispec.Descriptor

	fields    map[string]json.RawMessage
	rawConfig map[string]json.RawMessage
	rawLayers []json.RawMessage
}

// ParseManifest parses and checks an image manifest. An image index or docker manifest list
// is rejected with ErrUnsupported: pick a platform's manifest first.
func ParseManifest(data []byte) (*Manifest, error) {
	if len(data) > MaxManifestSize {
		return nil, fmt.Errorf("%w: manifest of %d bytes, at most %d", ErrTooLarge, len(data), MaxManifestSize)
	}
	m := &Manifest{}
	if err := json.Unmarshal(data, &m.fields); err != nil || m.fields == nil {
		return nil, fmt.Errorf("%w: manifest is not a JSON object: %v", ErrInvalid, err)
	}
	// Read the fields by their exact names: encoding/json would match "SchemaVersion" too,
	// and the rewrite keeps keys as they are.
	var head struct {
		schemaVersion int
		mediaType     string
	}
	if err := unmarshalField(m.fields, "schemaVersion", &head.schemaVersion); err != nil {
		return nil, err
	}
	if err := unmarshalField(m.fields, "mediaType", &head.mediaType); err != nil {
		return nil, err
	}
	_, hasManifests := m.fields["manifests"]
	switch {
	case head.mediaType == ocispec.MediaTypeImageIndex || head.mediaType == MediaTypeDockerManifestList ||
		head.mediaType == "" && hasManifests:
		return nil, fmt.Errorf("%w: %q is an image index, not a manifest: choose a platform", ErrUnsupported, head.mediaType)
	case head.mediaType != "" && head.mediaType != ocispec.MediaTypeImageManifest && head.mediaType != MediaTypeDockerManifest:
		return nil, fmt.Errorf("%w: manifest media type %q", ErrUnsupported, head.mediaType)
	case head.schemaVersion != 2:
		return nil, fmt.Errorf("%w: manifest schemaVersion %d, want 2", ErrInvalid, head.schemaVersion)
	}
	if err := json.Unmarshal(m.fields["config"], &m.rawConfig); err != nil || m.rawConfig == nil {
		return nil, fmt.Errorf("%w: manifest config is not a descriptor object: %v", ErrInvalid, err)
	}
	if err := unmarshalDescriptor(m.fields["config"], &m.Config, "config"); err != nil {
		return nil, err
	}
	if raw, ok := m.fields["layers"]; ok {
		if err := json.Unmarshal(raw, &m.rawLayers); err != nil {
			return nil, fmt.Errorf("%w: manifest layers: %v", ErrInvalid, err)
		}
	}
	m.Layers = make([]ocispec.Descriptor, len(m.rawLayers))
	for i, raw := range m.rawLayers {
		if err := unmarshalDescriptor(raw, &m.Layers[i], fmt.Sprintf("layer %d", i)); err != nil {
			return nil, err
		}
	}
	m.MediaType = head.mediaType
	if m.MediaType == "" {
		m.MediaType = ocispec.MediaTypeImageManifest
		if m.Config.MediaType == MediaTypeDockerConfig {
			m.MediaType = MediaTypeDockerManifest
		}
	}
	return m, nil
}

// unmarshalField decodes fields[name] into v if present.
func unmarshalField(fields map[string]json.RawMessage, name string, v any) error {
	raw, ok := fields[name]
	if !ok {
		return nil
	}
	if err := json.Unmarshal(raw, v); err != nil {
		return fmt.Errorf("%w: manifest %s: %v", ErrInvalid, name, err)
	}
	return nil
}

func unmarshalDescriptor(raw json.RawMessage, d *ocispec.Descriptor, what string) error {
	if err := json.Unmarshal(raw, d); err != nil {
		return fmt.Errorf("%w: manifest %s: %v", ErrInvalid, what, err)
	}
	if err := d.Digest.Validate(); err != nil {
		return fmt.Errorf("%w: manifest %s: digest %q: %v", ErrInvalid, what, d.Digest, err)
	}
	if d.Size < 0 || d.MediaType == "" {
		return fmt.Errorf("%w: manifest %s: size %d, media type %q", ErrInvalid, what, d.Size, d.MediaType)
	}
	return nil
}

// Docker says whether the manifest uses docker media types.
func (m *Manifest) Docker() bool { return m.MediaType == MediaTypeDockerManifest }

// TraceLayerType is the media type a trace layer takes in this manifest.
func (m *Manifest) TraceLayerType() string {
	if m.Docker() {
		return MediaTypeDockerLayer
	}
	return ocispec.MediaTypeImageLayer
}

// TraceLayer returns the index of the manifest's trace layer (the last one annotated as an
// acceleration layer), or -1.
func (m *Manifest) TraceLayer() int {
	for i := len(m.Layers) - 1; i >= 0; i-- {
		if IsTraceLayer(m.Layers[i]) {
			return i
		}
	}
	return -1
}

// config is a parsed image config, kept as JSON objects like Manifest.
type config struct {
	fields  map[string]json.RawMessage
	rootfs  map[string]json.RawMessage
	diffIDs []digest.Digest
	history []json.RawMessage
	empty   []bool // history[i] is an empty_layer entry
}

func parseConfig(data []byte) (*config, error) {
	if len(data) > MaxConfigSize {
		return nil, fmt.Errorf("%w: config of %d bytes, at most %d", ErrTooLarge, len(data), MaxConfigSize)
	}
	c := &config{}
	if err := json.Unmarshal(data, &c.fields); err != nil || c.fields == nil {
		return nil, fmt.Errorf("%w: config is not a JSON object: %v", ErrInvalid, err)
	}
	if err := json.Unmarshal(c.fields["rootfs"], &c.rootfs); err != nil || c.rootfs == nil {
		return nil, fmt.Errorf("%w: config rootfs is not an object: %v", ErrInvalid, err)
	}
	var typ string
	if err := json.Unmarshal(c.rootfs["type"], &typ); err != nil || typ != "layers" {
		return nil, fmt.Errorf("%w: config rootfs type %s, want \"layers\"", ErrInvalid, c.rootfs["type"])
	}
	if err := json.Unmarshal(c.rootfs["diff_ids"], &c.diffIDs); err != nil {
		return nil, fmt.Errorf("%w: config rootfs.diff_ids: %v", ErrInvalid, err)
	}
	for i, d := range c.diffIDs {
		if err := d.Validate(); err != nil {
			return nil, fmt.Errorf("%w: config diff_id %d %q: %v", ErrInvalid, i, d, err)
		}
	}
	if raw, ok := c.fields["history"]; ok && !bytes.Equal(raw, []byte("null")) {
		if err := json.Unmarshal(raw, &c.history); err != nil {
			return nil, fmt.Errorf("%w: config history: %v", ErrInvalid, err)
		}
	}
	c.empty = make([]bool, len(c.history))
	for i, h := range c.history {
		var e struct {
			EmptyLayer bool `json:"empty_layer"`
		}
		if err := json.Unmarshal(h, &e); err != nil {
			return nil, fmt.Errorf("%w: config history entry %d: %v", ErrInvalid, i, err)
		}
		c.empty[i] = e.EmptyLayer
	}
	return c, nil
}

// historyOf returns the history entry of layer i, the i-th entry that is not an empty_layer
// one. Docker allows a history that does not list every layer; then the entry is the last
// one created by one of createdBy (how this package writes a trace layer's entry), or -1.
func (c *config) historyOf(i int, createdBy ...string) int {
	var layers []int
	for j, empty := range c.empty {
		if !empty {
			layers = append(layers, j)
		}
	}
	if len(layers) == len(c.diffIDs) {
		return layers[i]
	}
	for j := len(c.history) - 1; j >= 0; j-- {
		var e struct {
			CreatedBy string `json:"created_by"`
		}
		if !c.empty[j] && json.Unmarshal(c.history[j], &e) == nil && slices.Contains(createdBy, e.CreatedBy) {
			return j
		}
	}
	return -1
}

// UpdateOptions tune Update.
type UpdateOptions struct {
	// CreatedBy is the trace layer's history created_by (default DefaultCreatedBy).
	CreatedBy string
	// Created dates the history entry. Zero leaves the date out, so the same inputs give the
	// same config and manifest digests.
	Created time.Time
}

// Updated is a rewritten manifest and config.
type Updated struct {
	Manifest     []byte
	ManifestDesc ocispec.Descriptor
	Config       []byte
	ConfigDesc   ocispec.Descriptor
	// Replaced is the trace layer dropped from the old manifest, if it had one.
	Replaced *ocispec.Descriptor
}

type historyEntry struct {
	Created    *time.Time `json:"created,omitempty"`
	CreatedBy  string     `json:"created_by"`
	EmptyLayer bool       `json:"empty_layer"`
}
