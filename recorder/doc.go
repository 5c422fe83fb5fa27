// Package recorder turns the block requests a container issues to an overlaybd image's device
// into a trace: which byte ranges of which layers it read, in first-access order, with times.
//
// A [Mapper] takes requests as the capture delivers them ([Mapper.Add]), maps each sector range
// through the image's merged LSMT index ([lsmt.Stack]) to per-layer byte ranges, drops bytes
// already recorded, merges a range that continues its layer's previous frame, and keeps the
// result under a frame cap. It knows nothing of devices or eBPF: the capture is adapted to
// [Request].
//
// Subpackages build on the frames: image writes the trace layer and the new image that carries
// it; report summarises and plots a trace.
package recorder
