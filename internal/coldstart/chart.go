package coldstart

import (
	"fmt"
	"image"
	"image/color"
	"image/draw"
	"image/png"
	"io"
	"math"

	"golang.org/x/image/font"
	"golang.org/x/image/font/basicfont"
	"golang.org/x/image/math/fixed"
)

// Chart geometry, in pixels.
const (
	chartWidth  = 900
	barHeight   = 34
	barGap      = 22
	chartTop    = 56
	chartLeft   = 130
	chartRight  = 190 // room for the value labels
	chartBottom = 40
)

var (
	chartBg   = color.RGBA{255, 255, 255, 255}
	chartInk  = color.RGBA{0, 0, 0, 255}
	chartGrid = color.RGBA{225, 225, 225, 255}
	// barColors: no prefetch, replay, full prefetch, warm (Tableau 10).
	barColors = [numVariants]color.RGBA{{214, 39, 40, 255}, {44, 160, 44, 255}, {31, 119, 180, 255}, {127, 127, 127, 255}}
)

// WriteChart draws the medians as a horizontal bar chart (start time, with
// the range of the rounds as a whisker) and encodes it as a PNG.
func WriteChart(w io.Writer, title string, s [numVariants]Summary) error {
	h := chartTop + int(numVariants)*(barHeight+barGap) + chartBottom
	img := image.NewRGBA(image.Rect(0, 0, chartWidth, h))
	draw.Draw(img, img.Bounds(), image.NewUniform(chartBg), image.Point{}, draw.Src)
	hi := 0.0
	for _, x := range s {
		hi = max(hi, x.Max.Seconds(), x.Start.Seconds())
	}
	step := tickStep(hi)
	top := math.Max(step, math.Ceil(hi/step)*step)
	x0, x1 := chartLeft, chartWidth-chartRight
	px := func(v float64) int { return x0 + int(math.Round(v/top*float64(x1-x0))) }
	label(img, 10, 22, title)
	yAxis := h - chartBottom
	for v := 0.0; v <= top*1.0001; v += step {
		x := px(v)
		fill(img, x, chartTop-8, x+1, yAxis, chartGrid)
		t := fmt.Sprintf("%g s", math.Round(v*100)/100)
		label(img, x-len(t)*7/2, yAxis+18, t)
	}
	fill(img, x0, chartTop-8, x0+1, yAxis, chartInk)
	fill(img, x0, yAxis, x1, yAxis+1, chartInk)
	for i, x := range s {
		y := chartTop + i*(barHeight+barGap)
		label(img, 10, y+barHeight/2+5, x.Variant.String())
		fill(img, x0+1, y, px(x.Start.Seconds()), y+barHeight, barColors[i])
		if x.N > 1 { // whisker: the rounds' range
			mid := y + barHeight/2
			fill(img, px(x.Min.Seconds()), mid, px(x.Max.Seconds())+1, mid+1, chartInk)
			fill(img, px(x.Min.Seconds()), mid-6, px(x.Min.Seconds())+1, mid+7, chartInk)
			fill(img, px(x.Max.Seconds()), mid-6, px(x.Max.Seconds())+1, mid+7, chartInk)
		}
		label(img, max(px(x.Start.Seconds()), px(x.Max.Seconds()))+8, y+barHeight/2+5,
			fmt.Sprintf("%.2f s, %s", x.Start.Seconds(), mb(x.LinkBytes)))
	}
	if err := png.Encode(w, img); err != nil {
		return fmt.Errorf("coldstart: encode PNG: %w", err)
	}
	return nil
}

// tickStep is 1, 2 or 5 times a power of ten, about a sixth of hi.
func tickStep(hi float64) float64 {
	if hi <= 0 || math.IsNaN(hi) || math.IsInf(hi, 0) {
		return 1
	}
	raw := hi / 6
	mag := math.Pow(10, math.Floor(math.Log10(raw)))
	for _, m := range []float64{1, 2, 5} {
		if m*mag >= raw {
			return m * mag
		}
	}
	return 10 * mag
}

func fill(img *image.RGBA, x0, y0, x1, y1 int, c color.RGBA) {
	draw.Draw(img, image.Rect(x0, y0, x1, y1).Intersect(img.Bounds()), image.NewUniform(c), image.Point{}, draw.Src)
}

func label(img *image.RGBA, x, y int, s string) {
	d := font.Drawer{Dst: img, Src: image.NewUniform(chartInk), Face: basicfont.Face7x13, Dot: fixed.P(x, y)}
	d.DrawString(s)
}
