package main

import (
	"errors"
	"fmt"
	"math/bits"
	"strconv"
	"strings"
)

// errSize is wrapped by every size parse error.
var errSize = errors.New("invalid size")

// sizeUnits are binary multipliers, as in qemu-img and dd: K is 1024.
var sizeUnits = map[string]uint64{
	"":  1,
	"K": 1 << 10,
	"M": 1 << 20,
	"G": 1 << 30,
	"T": 1 << 40,
	"P": 1 << 50,
	"E": 1 << 60,
}

// parseSize parses a byte count such as "512", "10G", "32MiB" or "1.5G".
// Suffixes K, M, G, T, P, E (case-insensitive, optionally followed by "iB"
// or "B") are powers of 1024. A fraction is accepted only when the result is
// a whole number of bytes ("1.5K" is 1536, "0.3K" is refused). Zero,
// negative numbers and values that do not fit in 64 bits are refused.
func parseSize(s string) (uint64, error) {
	num, unit := splitUnit(strings.TrimSpace(s))
	mult, ok := sizeUnits[unit]
	if !ok || num == "" {
		return 0, fmt.Errorf("%w %q: want a number with an optional K/M/G/T/P/E suffix", errSize, s)
	}
	intPart, frac, hasDot := strings.Cut(num, ".")
	if (hasDot && frac == "") || intPart == "" || !allDigits(intPart) || !allDigits(frac) {
		return 0, fmt.Errorf("%w %q: not a decimal number", errSize, s)
	}
	if len(frac) > 18 {
		return 0, fmt.Errorf("%w %q: too many decimal places", errSize, s)
	}
	whole, err := strconv.ParseUint(intPart, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("%w %q: does not fit in 64 bits", errSize, s)
	}
	hi, v := bits.Mul64(whole, mult)
	if hi != 0 {
		return 0, fmt.Errorf("%w %q: does not fit in 64 bits", errSize, s)
	}
	if frac != "" {
		f, _ := strconv.ParseUint(frac, 10, 64) // at most 18 digits: fits
		den := uint64(1)
		for range len(frac) {
			den *= 10
		}
		// f*mult / den computed in 128 bits; f < den, so the quotient is
		// below mult and Div64 cannot overflow.
		fhi, flo := bits.Mul64(f, mult)
		q, rem := bits.Div64(fhi, flo, den)
		if rem != 0 {
			return 0, fmt.Errorf("%w %q: not a whole number of bytes", errSize, s)
		}
		var carry uint64
		v, carry = bits.Add64(v, q, 0)
		if carry != 0 {
			return 0, fmt.Errorf("%w %q: does not fit in 64 bits", errSize, s)
		}
	}
	if v == 0 {
		return 0, fmt.Errorf("%w %q: must be greater than zero", errSize, s)
	}
	return v, nil
}

// splitUnit separates "10GiB" into "10" and "G".
func splitUnit(s string) (num, unit string) {
	u := strings.ToUpper(s)
	for _, tail := range []string{"IB", "B"} {
		if len(u) > len(tail)+1 && strings.HasSuffix(u, tail) {
			// "iB"/"B" only after a unit letter: "512B" is not accepted as
			// bytes, to keep one spelling per value.
			c := u[len(u)-len(tail)-1]
			if c >= 'A' && c <= 'Z' {
				u = u[:len(u)-len(tail)]
				break
			}
		}
	}
	if n := len(u); n > 0 && u[n-1] >= 'A' && u[n-1] <= 'Z' {
		return u[:n-1], u[n-1:]
	}
	return u, ""
}

func allDigits(s string) bool {
	for _, c := range s {
		if c < '0' || c > '9' {
			return false
		}
	}
	return true
}

// formatSize renders n for humans: "10 GiB" when exact, otherwise with one
// decimal, always followed by the byte count when not exact.
func formatSize(n uint64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	i := 0
	for i < len(units)-1 && n >= 1<<(10*(i+1)) {
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	shift := uint(10 * i)
	if n&(1<<shift-1) == 0 {
		return fmt.Sprintf("%d %s", n>>shift, units[i])
	}
	return fmt.Sprintf("%.1f %s (%d bytes)", float64(n)/float64(uint64(1)<<shift), units[i], n)
}

// sizeFlag is a flag.Value holding a parsed size.
type sizeFlag struct {
	v   uint64
	set bool
}

func (f *sizeFlag) String() string {
	if f == nil || !f.set {
		return ""
	}
	return strconv.FormatUint(f.v, 10)
}

func (f *sizeFlag) Set(s string) error {
	v, err := parseSize(s)
	if err != nil {
		return err
	}
	f.v, f.set = v, true
	return nil
}
