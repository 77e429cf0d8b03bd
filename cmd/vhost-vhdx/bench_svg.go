package main

import (
	"fmt"
	"io"
	"math"
)

// writeSweepSVG plots median IOPS against queue depth (log2 axis) for each
// back-end as a self-contained SVG: no plotting library, so the report
// can be regenerated anywhere the project builds.
func writeSweepSVG(w io.Writer, s benchSummary) {
	const (
		width, height          = 720, 400
		left, right, top, bott = 80, 170, 40, 50
	)
	qds := sweepDepths(s)
	ymax := 0.0
	for _, m := range s.sweep {
		for _, v := range m {
			ymax = max(ymax, v)
		}
	}
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(w, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(w, `<text x="%d" y="22" text-anchor="middle" font-size="14">4K random read, 1 queue: IOPS against queue depth</text>`+"\n", (left+width-right)/2)
	if len(qds) == 0 || ymax <= 0 {
		fmt.Fprintln(w, `<text x="320" y="200" text-anchor="middle">no sweep data</text></svg>`)
		return
	}
	ystep := niceStep(ymax / 5)
	ytop := math.Ceil(ymax/ystep) * ystep
	pw, ph := float64(width-left-right), float64(height-top-bott)
	lo, hi := math.Log2(float64(qds[0])), math.Log2(float64(qds[len(qds)-1]))
	x := func(qd int) float64 {
		if hi == lo {
			return float64(left) + pw/2
		}
		return float64(left) + (math.Log2(float64(qd))-lo)/(hi-lo)*pw
	}
	y := func(v float64) float64 { return float64(top) + ph - v/ytop*ph }
	// Grid and axes.
	for v := 0.0; v <= ytop+ystep/2; v += ystep {
		fmt.Fprintf(w, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>`+"\n", left, y(v), width-right, y(v))
		fmt.Fprintf(w, `<text x="%d" y="%.1f" text-anchor="end">%s</text>`+"\n", left-6, y(v)+4, kilo(v))
	}
	for _, qd := range qds {
		fmt.Fprintf(w, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#eee"/>`+"\n", x(qd), top, x(qd), height-bott)
		fmt.Fprintf(w, `<text x="%.1f" y="%d" text-anchor="middle">%d</text>`+"\n", x(qd), height-bott+16, qd)
	}
	fmt.Fprintf(w, `<rect x="%d" y="%d" width="%.0f" height="%.0f" fill="none" stroke="#333"/>`+"\n", left, top, pw, ph)
	fmt.Fprintf(w, `<text x="%.0f" y="%d" text-anchor="middle">queue depth (requests in flight)</text>`+"\n", float64(left)+pw/2, height-12)
	fmt.Fprintf(w, `<text x="18" y="%.0f" text-anchor="middle" transform="rotate(-90 18 %.0f)">IOPS (median of runs)</text>`+"\n", float64(top)+ph/2, float64(top)+ph/2)
	series := []struct{ be, label, color string }{
		{"ours", "vhost-vhdx serve", "#1f77b4"},
		{"qsd", "qemu-storage-daemon", "#d62728"},
	}
	for i, sr := range series {
		m := s.sweep[sr.be]
		if len(m) == 0 {
			continue
		}
		pts := ""
		for _, qd := range qds {
			if v, ok := m[qd]; ok {
				pts += fmt.Sprintf("%.1f,%.1f ", x(qd), y(v))
			}
		}
		fmt.Fprintf(w, `<polyline points="%s" fill="none" stroke="%s" stroke-width="2"/>`+"\n", pts, sr.color)
		for _, qd := range qds {
			if v, ok := m[qd]; ok {
				fmt.Fprintf(w, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s QD%d: %.0f IOPS</title></circle>`+"\n", x(qd), y(v), sr.color, sr.label, qd, v)
			}
		}
		ly := top + 10 + 20*i
		fmt.Fprintf(w, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"/>`+"\n", width-right+10, ly, width-right+30, ly, sr.color)
		fmt.Fprintf(w, `<text x="%d" y="%d">%s</text>`+"\n", width-right+34, ly+4, sr.label)
	}
	fmt.Fprintln(w, "</svg>")
}

// niceStep rounds v up to 1, 2 or 5 times a power of ten.
func niceStep(v float64) float64 {
	if v <= 0 {
		return 1
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 5, 10} {
		if m*p >= v {
			return m * p
		}
	}
	return 10 * p
}

func kilo(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%gM", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%gk", v/1e3)
	}
	return fmt.Sprintf("%g", v)
}
