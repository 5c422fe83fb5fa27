// Package image owns the trace layer and the image that carries it: BuildLayer and WriteLayer
// encode a trace as the deterministic tar upstream overlaybd expects (upstream's binary
// `trace` plus this project's `trace.pb`), ReadLayer decodes one, Update rewrites a manifest
// and config so a new trace layer replaces any old one, and AddTraceLayer runs that over a
// Store: a local OCI image layout (Layout) or, behind the same interface, a registry.
//
// Manifests, configs and index files are edited as JSON objects, not through typed structs,
// so fields this package does not know (docker's container_config, annotations, a subject)
// survive unchanged. Everything read is size-bounded and validated; errors wrap the sentinels
// below.
package image

import "errors"

// Sentinel errors.
var (
	// ErrInvalid reports a manifest, config or index that is not what it claims to be.
	ErrInvalid = errors.New("image: invalid document")
	// ErrUnsupported reports a valid input this package does not handle, such as an image
	// index where a manifest is needed.
	ErrUnsupported = errors.New("image: unsupported")
	// ErrLayer reports a trace layer that is not a readable tar.
	ErrLayer = errors.New("image: bad trace layer")
	// ErrNoTrace reports a trace layer without a trace in it.
	ErrNoTrace = errors.New("image: no trace in layer")
	// ErrNotFound reports a reference or blob a store does not have.
	ErrNotFound = errors.New("image: not found")
	// ErrTooLarge reports a document or blob over its size limit.
	ErrTooLarge = errors.New("image: too large")
	// ErrDigest reports content that does not match its descriptor.
	ErrDigest = errors.New("image: content does not match its descriptor")
)
