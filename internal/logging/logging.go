// Package logging builds the project's zerolog loggers: JSON lines by
// default, a human console format when stderr is a terminal.
package logging

import (
	"fmt"
	"io"
	"os"
	"time"

	"github.com/mattn/go-isatty"
	"github.com/rs/zerolog"
)

// Options choose the logger's level and format.
type Options struct {
	Level  string    // trace, debug, info, warn, error; default info
	Format string    // json, console, or auto (console on a terminal)
	Out    io.Writer // default os.Stderr
}

// New returns a logger for opts.
func New(opts Options) (zerolog.Logger, error) {
	out := opts.Out
	if out == nil {
		out = os.Stderr
	}
	level := zerolog.InfoLevel
	if opts.Level != "" {
		l, err := zerolog.ParseLevel(opts.Level)
		if err != nil {
			return zerolog.Logger{}, fmt.Errorf("log level %q: %w", opts.Level, err)
		}
		level = l
	}
	switch opts.Format {
	case "", "auto":
		if f, ok := out.(*os.File); ok && isatty.IsTerminal(f.Fd()) {
			out = zerolog.ConsoleWriter{Out: out, TimeFormat: time.TimeOnly}
		}
	case "console":
		out = zerolog.ConsoleWriter{Out: out, TimeFormat: time.TimeOnly, NoColor: true}
	case "json":
	default:
		return zerolog.Logger{}, fmt.Errorf("log format %q: want json, console or auto", opts.Format)
	}
	return zerolog.New(out).Level(level).With().Timestamp().Logger(), nil
}
