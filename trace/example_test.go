package trace_test

import (
	"bytes"
	"fmt"

	"github.com/opencontainers/go-digest"

	"github.com/obdtrace/obdtrace/trace"
)

// A trace layer carries both encodings; a reader tells them apart by content.
func Example() {
	t := &trace.Trace{
		Layers: []trace.Layer{{Digest: digest.FromString("base")}, {Digest: digest.FromString("app")}},
		Meta:   trace.Meta{Source: trace.SourceCLI, Runs: 1},
		Frames: []trace.Frame{
			{Layer: 1, Offset: 0, Length: 4096, TimeNS: 0},
			{Layer: 1, Offset: 4096, Length: 16384, TimeNS: 35_000},
			{Layer: 0, Offset: 1 << 20, Length: 4096, TimeNS: 80_000},
		},
	}
	pb, err := trace.MarshalPB(t)
	if err != nil {
		panic(err)
	}
	var bin bytes.Buffer
	if err := trace.ToBinary(&bin, t); err != nil {
		panic(err)
	}
	for _, data := range [][]byte{pb, bin.Bytes(), []byte("/usr/bin/\n")} {
		switch kind := trace.Detect(data); kind {
		case trace.KindProtobuf:
			got, err := trace.UnmarshalPB(data)
			fmt.Println(kind, len(data), "bytes:", got.Frames, err)
		case trace.KindBinary:
			frames, err := trace.ReadBinary(bytes.NewReader(data), int64(len(data)))
			fmt.Println(kind, len(data), "bytes:", frames, err)
		case trace.KindPathList:
			paths, err := trace.ParsePathList(data)
			fmt.Println(kind, paths, err)
		}
	}
	// Output:
	// protobuf 194 bytes: [{1 0 4096 0} {1 4096 16384 35000} {0 1048576 4096 80000}] <nil>
	// binary 96 bytes: [{1 0 4096 0} {1 4096 16384 0} {0 1048576 4096 0}] <nil>
	// path list [/usr/bin/] <nil>
}
