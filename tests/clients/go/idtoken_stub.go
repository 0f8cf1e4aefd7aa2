//go:build noidtoken
// +build noidtoken

package main

import "context"

// fetchIDToken: built with -tags noidtoken (google.golang.org/api/idtoken unavailable).
func fetchIDToken(ctx context.Context, audience string) (string, int64, bool, error) {
	return "", 0, false, nil
}
