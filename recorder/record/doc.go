// Package record owns the record workflow behind `obd-recorder record`: it
// turns an overlaybd image into a traced image by running it once.
//
// Run starts a temporary container of the image through containerd and the
// project's snapshotter, asking the snapshotter with upstream's labels
// (record-trace=yes, record-trace-path=FILE with FILE empty) to record the
// blocks the container reads from the image's device. It lets the container
// run for a duration, until it exits, or until asked to stop; stops it
// (SIGTERM, then SIGKILL after a grace period); waits for the snapshotter's
// trace (FILE.ok); writes a new image into containerd whose last layer is the
// trace layer (replacing any old one, see recorder/image); and optionally
// pushes it to the registry. Everything it creates in containerd (container,
// task, active snapshot, lease) is removed again, also when ctx is cancelled.
//
// The package talks to containerd and the registry only through their client
// libraries; the recording itself happens in the snapshotter's backstore.
package record
