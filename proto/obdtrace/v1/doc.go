// Package tracev1 is the generated Go for obdtrace/v1/trace.proto, the trace.pb format. It
// holds no logic: package trace owns the model, validation and conversion to and from it.
package tracev1

// The proto root is proto/, so the file registers as "obdtrace/v1/trace.proto" and cannot
// clash with another module's "trace.proto" in protobuf's global registry.
//go:generate protoc -I ../.. --plugin=protoc-gen-go=../../../bin/tools/protoc-gen-go --go_out=../.. --go_opt=paths=source_relative ../../obdtrace/v1/trace.proto
