//go:build !race

package vhdx

// raceEnabled: see race_on_test.go.
const raceEnabled = false
