package trace

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

func TestDetect(t *testing.T) {
	pb, err := MarshalPB(sampleTrace())
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		data []byte
		want Kind
	}{
		{"empty", nil, KindEmpty},
		{"binary", handBuiltGolden(t), KindBinary},
		{"binary magic only", []byte{0x20, 0x18, 0xEF, 0xC2}, KindBinary},
		{"protobuf", pb, KindProtobuf},
		{"path list", []byte("/usr/lib/python3/\n/usr/bin/python3\n"), KindPathList},
		{"path list after blank lines", []byte("\n  \r\n\t/etc/hosts"), KindPathList},
		{"relative first path", []byte("usr/bin\n/etc\n"), KindUnknown},
		{"blank text", []byte(" \n\n"), KindUnknown},
		{"NUL in text", []byte("/usr/bin\x00"), KindUnknown},
		{"not UTF-8", []byte("/usr/\xff"), KindUnknown},
		{"text over 64 KiB", []byte("/" + strings.Repeat("a", MaxPathList)), KindUnknown},
		{"other protobuf", []byte("\x0a\x0bobdtrace.v2"), KindUnknown},
		{"three magic bytes", []byte{0x20, 0x18, 0xEF}, KindUnknown},
	}
	for _, tc := range tests {
		if got := Detect(tc.data); got != tc.want {
			t.Errorf("%s: Detect = %v, want %v", tc.name, got, tc.want)
		}
	}
	if KindPathList.String() != "path list" || Kind(9).String() != "Kind(9)" {
		t.Errorf("Kind strings: %v, %v", KindPathList, Kind(9))
	}
}

func TestParsePathList(t *testing.T) {
	in := "/usr/lib/python3/\r\n\n  /usr/bin/python3  \n\t/etc//hosts\n/\n/opt/app//\n/srv/ünïcode file"
	want := []string{"/usr/lib/python3/", "/usr/bin/python3", "/etc/hosts", "/", "/opt/app/", "/srv/ünïcode file"}
	got, err := ParsePathList([]byte(in))
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("ParsePathList = %q, want %q", got, want)
	}
	if got, err := ParsePathList([]byte("\n \n")); err != nil || len(got) != 0 {
		t.Fatalf("blank list: %q, %v; want no paths and no error", got, err)
	}
	// Exactly the limit is accepted.
	full := "/" + strings.Repeat("a", MaxPathList-2) + "\n"
	if _, err := ParsePathList([]byte(full)); err != nil {
		t.Fatalf("%d-byte list: %v", len(full), err)
	}
}

func TestParsePathListRejects(t *testing.T) {
	tests := []struct {
		name, data string
		want       error
		text       string
	}{
		{"relative", "/ok\nusr/bin\n", ErrPathList, `line 2: "usr/bin" is not an absolute path`},
		{"dot-dot", "/usr/../etc/shadow", ErrPathList, `".." element`},
		{"dot", "/usr/./bin", ErrPathList, `"." element`},
		{"control character", "/usr/bin\x1b[31m", ErrPathList, "control character"},
		{"NUL", "/usr/bin\x00", ErrPathList, "control character"},
		{"not UTF-8", "/usr/\xff", ErrPathList, "not valid UTF-8"},
		{"too large", "/" + strings.Repeat("a", MaxPathList), ErrTooLarge, fmt.Sprint(MaxPathList + 1)},
	}
	for _, tc := range tests {
		got, err := ParsePathList([]byte(tc.data))
		if !errors.Is(err, tc.want) || got != nil || !strings.Contains(err.Error(), tc.text) {
			t.Errorf("%s: paths %q, err = %v; want %v mentioning %q", tc.name, got, err, tc.want, tc.text)
		}
	}
}
