// Package replayer turns a recorded trace into prefetch work on a mounted
// image: it matches the trace's layers to the image's by blob digest, turns
// frames (ranges of a layer's uncompressed LSMT byte space) into ranges of
// the layer blobs (through the ZFile jump table and the tar wrapper's
// offset), coalesces nearby ranges, and has workers fill the blob cache with
// them in first-access order, optionally under a bandwidth cap, then
// optionally fetches the rest of every layer in the background.
//
// The replayer never reads the device. It only asks the cache to make
// ranges local; demand reads stay ahead of it because the cache caps
// prefetch fills below the registry's connection limit, never caps demand,
// starts only one prefetch fetch beside a demand fetch in flight, and
// fetches only the blocks a range covers. While the trace phase runs the
// cache knows the plan (Expecter) and pauses its own readahead; the
// full-fetch phase does not pause it.
package replayer
