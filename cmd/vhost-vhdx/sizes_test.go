package main

import (
	"errors"
	"testing"
)

func TestParseSizeAcceptsBinarySuffixesAndExactFractions(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want uint64
	}{
		{"512", 512},
		{"1", 1},
		{"10G", 10 << 30},
		{"10g", 10 << 30},
		{"10GiB", 10 << 30},
		{"10GB", 10 << 30},
		{"32M", 32 << 20},
		{"4k", 4096},
		{"2T", 2 << 40},
		{"64T", 64 << 40},
		{"1P", 1 << 50},
		{"15E", 15 << 60},
		{"1.5G", 3 << 29},
		{"1.5K", 1536},
		{"0.5M", 512 << 10},
		{" 8M ", 8 << 20},
		{"18446744073709551615", 1<<64 - 1},
		{"15.5E", 15<<60 + 1<<59},
	} {
		got, err := parseSize(tc.in)
		if err != nil || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d", tc.in, got, err, tc.want)
		}
	}
}

func TestParseSizeRefusesZeroOverflowAndGarbage(t *testing.T) {
	for _, in := range []string{
		"", "0", "0K", "0.0G", // zero
		"16E", "18446744073709551616", "17179869184G", "16777216T", "15.99999999E", // overflow or inexact
		"-1", "+1", "1e9", "G", "1.", ".5G", "1..5G", "1.5.G", "1X", "10 G", "1KK", "0x10", "512B", "1iB",
		"0.3K",                   // 307.2 bytes
		"1.0000000000000000001K", // 19 decimals
	} {
		if got, err := parseSize(in); err == nil || !errors.Is(err, errSize) {
			t.Errorf("parseSize(%q) = %d, %v; want an invalid size error", in, got, err)
		}
	}
}

func TestFormatSize(t *testing.T) {
	for _, tc := range []struct {
		in   uint64
		want string
	}{
		{0, "0 B"},
		{1023, "1023 B"},
		{1024, "1 KiB"},
		{10 << 30, "10 GiB"},
		{3 << 29, "1.5 GiB (1610612736 bytes)"},
		{1<<64 - 1, "16.0 EiB (18446744073709551615 bytes)"},
	} {
		if got := formatSize(tc.in); got != tc.want {
			t.Errorf("formatSize(%d) = %q, want %q", tc.in, got, tc.want)
		}
	}
}
