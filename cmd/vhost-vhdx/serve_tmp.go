package main

import "errors"

// runServe is a placeholder until serve.go lands; delete this file then.
func runServe(args []string) error {
	return errors.New("serve: not built yet")
}
