//go:build race

package vhdx

// raceEnabled: the race detector keeps shadow memory for every byte the
// program writes, so resident-set bounds do not hold under -race.
const raceEnabled = true
