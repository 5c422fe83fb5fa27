package report

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"
	"strconv"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"

	"github.com/obdtrace/obdtrace/internal/atomicfile"
	"github.com/obdtrace/obdtrace/trace"
)

// PlotOptions size the chart. Zero values take the defaults (1200 x 800 pixels).
type PlotOptions struct {
	Width, Height int
}

// Minimum and default chart sizes: below the minimum the labels overlap the panels.
const (
	minWidth, minHeight         = 600, 400
	defaultWidth, defaultHeight = 1200, 800
	legendWidth                 = 210
	leftMargin                  = 80
	maxLegendLayers             = 40
)

var (
	white     = color.RGBA{255, 255, 255, 255}
	black     = color.RGBA{0, 0, 0, 255}
	gridColor = color.RGBA{225, 225, 225, 255}
	// palette holds distinguishable colours for layers (Tableau 10), reused past ten layers.
	palette = [...]color.RGBA{
		{31, 119, 180, 255}, {255, 127, 14, 255}, {44, 160, 44, 255}, {214, 39, 40, 255},
		{148, 103, 189, 255}, {140, 86, 75, 255}, {227, 119, 194, 255}, {127, 127, 127, 255},
		{188, 189, 34, 255}, {23, 190, 207, 255},
	}
)

// WritePNG draws t's chart (see Plot) as a PNG.
func WritePNG(w io.Writer, t *trace.Trace, opts PlotOptions) error {
	if err := png.Encode(w, Plot(t, opts)); err != nil {
		return fmt.Errorf("report: encode PNG: %w", err)
	}
	return nil
}

// Plot draws two panels over the same time axis: each frame as a vertical bar at its
// first-access time spanning its byte range in its layer (colour = layer), and the bytes
// recorded so far, in total and per layer. Untimed traces use frame order as the time axis.
func Plot(t *trace.Trace, opts PlotOptions) *image.RGBA {
	w, h := opts.Width, opts.Height
	if w == 0 && h == 0 {
		w, h = defaultWidth, defaultHeight
	}
	w, h = max(w, minWidth), max(h, minHeight)
	c := &canvas{img: image.NewRGBA(image.Rect(0, 0, w, h))}
	draw.Draw(c.img, c.img.Bounds(), image.NewUniform(white), image.Point{}, draw.Src)

	s := Summarize(t)
	xs := frameX(t, s.Timed)
	var xMax, offMax float64
	for i, f := range t.Frames {
		xMax = max(xMax, xs[i])
		offMax = max(offMax, float64(f.End()))
	}
	xAxis := newAxis(xMax, false)
	right := w - legendWidth
	panelGap := 60
	top := panel{x0: leftMargin, x1: right, y0: 50, y1: 50 + (h-50-45-panelGap)*3/5, x: xAxis, y: newAxis(offMax, true)}
	bottom := panel{x0: leftMargin, x1: right, y0: top.y1 + panelGap, y1: h - 45, x: xAxis, y: newAxis(float64(s.Bytes), true)}

	c.text(10, 20, black, title(s))
	c.text(top.x0, top.y0-8, black, "offset in layer (each frame: its byte range at its first access)")
	c.text(bottom.x0, bottom.y0-8, black, "bytes recorded so far (black: all layers)")
	top.frame(c, FormatBytesShort)
	bottom.frame(c, FormatBytesShort)
	xLabel := "time since recording start"
	if !s.Timed {
		xLabel = "frame number (untimed trace)"
	}
	c.text((bottom.x0+bottom.x1)/2-len(xLabel)*7/2, h-8, black, xLabel)
	xFormat := timeFormatter(xAxis.max, s.Timed)
	top.xTicks(c, xFormat)
	bottom.xTicks(c, xFormat)

	for i, f := range t.Frames {
		if f.Layer < 0 || f.Layer >= len(t.Layers) {
			continue
		}
		px := top.px(xs[i])
		y0, y1 := top.py(float64(f.Offset)), top.py(float64(f.End()))
		c.fill(px-1, y1, px+1, max(y0, y1+1), palette[f.Layer%len(palette)])
	}
	drawCumulative(c, &bottom, t, xs)
	drawLegend(c, right+15, top.y0, s)
	return c.img
}

func title(s *Summary) string {
	span := "untimed"
	if s.Timed {
		span = fmt.Sprintf("span %.3f s", float64(s.LastNS-s.FirstNS)/1e9)
	}
	return fmt.Sprintf("%d frames, %s (%s unique), %d layers, %s",
		s.Frames, FormatBytes(s.Bytes), FormatBytes(s.UniqueBytes), len(s.Layers), span)
}

// frameX is each frame's position on the time axis: its time, or its index when untimed.
func frameX(t *trace.Trace, timed bool) []float64 {
	xs := make([]float64, len(t.Frames))
	for i, f := range t.Frames {
		xs[i] = float64(i)
		if timed {
			xs[i] = float64(f.TimeNS)
		}
	}
	return xs
}

// drawCumulative draws the running byte totals as step lines, per layer then overall.
func drawCumulative(c *canvas, p *panel, t *trace.Trace, xs []float64) {
	n := len(t.Layers)
	sums := make([]float64, n+1) // sums[n] is the total
	prev := make([]image.Point, n+1)
	for i := range prev {
		prev[i] = image.Point{p.x0, p.y1}
	}
	for i, f := range t.Frames {
		if f.Layer < 0 || f.Layer >= n {
			continue
		}
		for _, k := range []int{f.Layer, n} {
			sums[k] += float64(f.Length)
			pt := image.Point{p.px(xs[i]), p.py(sums[k])}
			col := black
			if k < n {
				col = palette[k%len(palette)]
			}
			c.line(prev[k].X, prev[k].Y, pt.X, prev[k].Y, col)
			c.line(pt.X, prev[k].Y, pt.X, pt.Y, col)
			prev[k] = pt
		}
	}
	for k := range prev { // carry each line to the right edge
		col := black
		if k < n {
			col = palette[k%len(palette)]
		}
		c.line(prev[k].X, prev[k].Y, p.x1, prev[k].Y, col)
	}
}

func drawLegend(c *canvas, x, y int, s *Summary) {
	c.text(x, y-8, black, "layer, digest, unique bytes")
	for i, l := range s.Layers {
		if i == maxLegendLayers {
			c.text(x, y+8+i*18, black, fmt.Sprintf("... %d more", len(s.Layers)-i))
			break
		}
		yy := y + i*18
		c.fill(x, yy, x+12, yy+12, palette[i%len(palette)])
		d := l.Digest.Encoded()
		if len(d) > 8 {
			d = d[:8]
		}
		c.text(x+18, yy+11, black, fmt.Sprintf("%d %s %s", i, d, FormatBytesShort(float64(l.UniqueBytes))))
	}
}

// timeFormatter labels time-axis ticks in a unit suiting the span, or as frame numbers.
func timeFormatter(span float64, timed bool) func(float64) string {
	if !timed {
		return func(v float64) string { return strconv.FormatFloat(v, 'f', -1, 64) }
	}
	unit, name := 1e9, "s"
	switch {
	case span < 1e3:
		unit, name = 1, "ns"
	case span < 1e6:
		unit, name = 1e3, "µs"
	case span < 1e9:
		unit, name = 1e6, "ms"
	}
	return func(v float64) string { return strconv.FormatFloat(v/unit, 'f', -1, 64) + name }
}

// FormatBytesShort formats a byte count for an axis label: 0, 512B, 64K, 1.5M, 2G.
func FormatBytesShort(v float64) string {
	units := []string{"B", "K", "M", "G", "T", "P"}
	i := 0
	for ; math.Abs(v) >= 1024 && i < len(units)-1; i++ {
		v /= 1024
	}
	if v == 0 {
		return "0"
	}
	return strconv.FormatFloat(math.Round(v*100)/100, 'f', -1, 64) + units[i]
}

// axis maps [0, max] onto a panel side with ticks every step: 1, 2 or 5 times a power of
// ten, of a binary unit (KiB, MiB...) for byte axes so that labels stay short.
type axis struct {
	max, step float64
}

func newAxis(hi float64, binary bool) axis {
	if hi <= 0 || math.IsNaN(hi) || math.IsInf(hi, 0) {
		hi = 1
	}
	unit := 1.0
	for binary && hi/unit >= 1024 {
		unit *= 1024
	}
	raw := hi / unit / 5
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	step := mag
	for _, m := range []float64{1, 2, 5, 10} {
		if step = m * mag; step >= raw {
			break
		}
	}
	if binary {
		step = max(step, 1) // no fractions of a byte
	}
	step *= unit
	return axis{max: math.Ceil(hi/step) * step, step: step}
}

type panel struct {
	x0, x1, y0, y1 int
	x, y           axis
}

func (p *panel) px(v float64) int {
	return p.x0 + int(math.Round(v/p.x.max*float64(p.x1-p.x0)))
}

func (p *panel) py(v float64) int {
	return p.y1 - int(math.Round(v/p.y.max*float64(p.y1-p.y0)))
}

// frame draws the panel's box, horizontal grid lines and y tick labels.
func (p *panel) frame(c *canvas, label func(float64) string) {
	for v := 0.0; v <= p.y.max*1.0001; v += p.y.step {
		y := p.py(v)
		c.line(p.x0, y, p.x1, y, gridColor)
		c.line(p.x0-5, y, p.x0, y, black)
		s := label(v)
		c.text(p.x0-8-len(s)*7, y+4, black, s)
	}
	c.line(p.x0, p.y0, p.x1, p.y0, black)
	c.line(p.x0, p.y1, p.x1, p.y1, black)
	c.line(p.x0, p.y0, p.x0, p.y1, black)
	c.line(p.x1, p.y0, p.x1, p.y1, black)
}

// xTicks draws the time ticks under the panel.
func (p *panel) xTicks(c *canvas, label func(float64) string) {
	for v := 0.0; v <= p.x.max*1.0001; v += p.x.step {
		x := p.px(v)
		c.line(x, p.y1, x, p.y1+5, black)
		s := label(v)
		c.text(x-len(s)*7/2, p.y1+18, black, s)
	}
}

// canvas is an RGBA image with the few drawing operations the chart needs.
type canvas struct {
	img *image.RGBA
}

func (c *canvas) fill(x0, y0, x1, y1 int, col color.RGBA) {
	r := image.Rect(x0, y0, x1, y1).Intersect(c.img.Bounds())
	draw.Draw(c.img, r, image.NewUniform(col), image.Point{}, draw.Src)
}

// line draws a line with Bresenham's algorithm.
func (c *canvas) line(x0, y0, x1, y1 int, col color.RGBA) {
	dx, dy := abs(x1-x0), -abs(y1-y0)
	sx, sy := sign(x1-x0), sign(y1-y0)
	e := dx + dy
	for {
		c.img.SetRGBA(x0, y0, col) // no-op outside the image
		if x0 == x1 && y0 == y1 {
			return
		}
		e2 := 2 * e
		if e2 >= dy {
			e += dy
			x0 += sx
		}
		if e2 <= dx {
			e += dx
			y0 += sy
		}
	}
}

func (c *canvas) text(x, y int, col color.RGBA, s string) {
	d := font.Drawer{Dst: c.img, Src: image.NewUniform(col), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}

func abs(v int) int {
	if v < 0 {
		return -v
	}
	return v
}

func sign(v int) int {
	switch {
	case v > 0:
		return 1
	case v < 0:
		return -1
	}
	return 0
}

// SavePNG writes t's chart to path as a PNG, atomically.
func SavePNG(path string, t *trace.Trace, opts PlotOptions) error {
	return atomicfile.WriteFunc(path, 0o644, func(w io.Writer) error { return WritePNG(w, t, opts) })
}
