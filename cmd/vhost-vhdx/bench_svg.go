package main

import (
	"encoding/xml"
	"fmt"
	"io"
	"math"
	"strings"
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

// writeRowsSVG draws, for each benchRow marked plot, a pair of horizontal
// bars: ours and the other back-end's median, IOPS for loads and seconds
// for commands. Each pair has its own scale (the rows differ by orders of
// magnitude), so the figure compares within a row; the ratio is printed
// beside it.
func writeRowsSVG(w io.Writer, s benchSummary) {
	const (
		width, left, right, top = 900, 20, 170, 50
		barH, rowH              = 14, 62
	)
	var rows []benchRow
	for _, r := range benchRows {
		if r.plot {
			rows = append(rows, r)
		}
	}
	height := top + rowH*len(rows) + 40
	pw := float64(width - left - right)
	fmt.Fprintf(w, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n", width, height, width, height)
	fmt.Fprintf(w, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(w, `<text x="%d" y="22" text-anchor="middle" font-size="14">Issue 12 rows: vhost-vhdx against the other back-end (medians; each pair on its own scale)</text>`+"\n", width/2)
	colors := [2]string{"#1f77b4", "#d62728"}
	for i, label := range []string{"vhost-vhdx (ours)", "qemu-storage-daemon or qemu-img"} {
		fmt.Fprintf(w, `<rect x="%d" y="%d" width="12" height="12" fill="%s"/><text x="%d" y="%d">%s</text>`+"\n",
			left+190*i, 32, colors[i], left+190*i+16, 42, label)
	}
	for i, r := range rows {
		o, b := s.pair(r)
		metric, unit, better := "iops", "IOPS", "higher is better"
		if r.exec {
			metric, unit, better = "seconds", "s", "time: lower is better"
		}
		vals := [2]float64{o.metric(metric), b.metric(metric)}
		labels := [2]string{r.oursLabel(), r.baseLabel()}
		y := top + rowH*i + 14
		fmt.Fprintf(w, `<text x="%d" y="%d" font-weight="bold">%s</text>`+"\n", left, y, xmlEscape(r.title))
		vmax := max(vals[0], vals[1])
		for j, v := range vals {
			by := y + 6 + (barH+3)*j
			if math.IsNaN(v) || vmax <= 0 {
				fmt.Fprintf(w, `<text x="%d" y="%d" fill="#777">%s: not measured</text>`+"\n", left, by+11, labels[j])
				continue
			}
			bw := v / vmax * pw
			exact, val := fmtNum(v, 0), kilo(math.Round(v))
			if r.exec {
				exact = fmtNum(v, 3)
				val = exact
			}
			fmt.Fprintf(w, `<rect x="%d" y="%d" width="%.1f" height="%d" fill="%s"><title>%s: %s %s</title></rect>`+"\n",
				left, by, bw, barH, colors[j], labels[j], exact, unit)
			fmt.Fprintf(w, `<text x="%.1f" y="%d">%s %s (%s)</text>`+"\n", float64(left)+bw+4, by+11, val, unit, labels[j])
		}
		fmt.Fprintf(w, `<text x="%d" y="%d" text-anchor="end"><tspan font-weight="bold">%s</tspan> <tspan fill="#777">(%s)</tspan></text>`+"\n",
			width-10, y, fmtRatio(ratio(vals[0], vals[1])), better)
	}
	fmt.Fprintln(w, "</svg>")
}

// xmlEscape escapes the characters SVG text cannot hold as they are.
func xmlEscape(s string) string {
	var b strings.Builder
	if err := xml.EscapeText(&b, []byte(s)); err != nil {
		return ""
	}
	return b.String()
}
