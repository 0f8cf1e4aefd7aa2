//go:build !noidtoken
// +build !noidtoken

package main

import (
	"context"

	"google.golang.org/api/idtoken"
)

// fetchIDToken uses google.golang.org/api/idtoken (Debian golang-google-api-dev).
func fetchIDToken(ctx context.Context, audience string) (string, int64, bool, error) {
	ts, err := idtoken.NewTokenSource(ctx, audience)
	if err != nil {
		return "", 0, false, err
	}
	setStage("idtoken.TokenSource.Token")
	tok, err := ts.Token()
	if err != nil {
		return "", 0, false, err
	}
	return tok.AccessToken, tok.Expiry.Unix(), true, nil
}
