// Test driver for metaemu: runs the real Go client libraries (cloud.google.com/go/compute/metadata,
// golang.org/x/oauth2/google, google.golang.org/api/idtoken) against the metadata server named by
// GCE_METADATA_HOST, in two flavours from this one source (build.sh): the current releases pinned by
// go.mod + go.sum (module mode), and Debian 12's packages (metadata 0.56, oauth2 0.3, api 0.61;
// GOPATH mode, where go.mod is ignored).
//
// Usage: metaemu-go-client AUDIENCE
// Prints ONE JSON object on stdout, or {"error": "...", "stage": "..."} and exits 1.
package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"cloud.google.com/go/compute/metadata"
	"golang.org/x/oauth2/google"
)

const scope = "https://www.googleapis.com/auth/cloud-platform"

type result struct {
	Available         bool     `json:"available"`
	Project           string   `json:"project"`
	NumericProject    string   `json:"numeric_project"`
	Email             string   `json:"email"`
	Scopes            []string `json:"scopes"`
	AccessToken       string   `json:"access_token"`
	TokenType         string   `json:"token_type"`
	ExpiryUnix        int64    `json:"expiry_unix"`
	AuthHeader        string   `json:"auth_header"`
	AuthProject       string   `json:"auth_project"`
	ADCAccessToken    string   `json:"adc_access_token"`
	MetadataIDToken   string   `json:"metadata_id_token"`
	IDToken           *string  `json:"id_token"`
	IDTokenExpiryUnix *int64   `json:"id_token_expiry_unix"`
	IDTokenLib        bool     `json:"idtoken_lib"`
}

var (
	mu    sync.Mutex
	stage = "startup"
)

func setStage(s string) {
	mu.Lock()
	stage = s
	mu.Unlock()
}

func fail(err interface{}) {
	mu.Lock()
	s := stage
	mu.Unlock()
	b, _ := json.Marshal(map[string]string{"error": fmt.Sprint(err), "stage": s})
	fmt.Println(string(b))
	os.Exit(1)
}

func main() {
	// Safety (clients.md §2, CL-13): without GCE_METADATA_HOST this library talks to 169.254.169.254.
	for _, name := range []string{"GCE_METADATA_HOST", "GCE_METADATA_IP", "GCE_METADATA_ROOT"} {
		v := os.Getenv(name)
		if v == "" || strings.Contains(v, "169.254.169.254") || strings.Contains(v, "metadata.google.internal") {
			setStage("env")
			fail(fmt.Sprintf("%s must point at a local metadata server (got %q)", name, v))
		}
	}
	if len(os.Args) < 2 || os.Args[1] == "" {
		setStage("args")
		fail("usage: metaemu-go-client AUDIENCE")
	}
	audience := os.Args[1]

	timeout := 45 * time.Second
	if ms := os.Getenv("METAEMU_CLIENT_TIMEOUT_MS"); ms != "" {
		if d, err := time.ParseDuration(ms + "ms"); err == nil {
			timeout = d
		}
	}
	time.AfterFunc(timeout, func() { fail(fmt.Sprintf("timed out after %s", timeout)) })

	ctx := context.Background()
	var r result
	var err error

	setStage("metadata.OnGCE")
	r.Available = metadata.OnGCE()

	setStage("metadata.ProjectID")
	if r.Project, err = metadata.ProjectID(); err != nil {
		fail(err)
	}
	setStage("metadata.NumericProjectID")
	if r.NumericProject, err = metadata.NumericProjectID(); err != nil {
		fail(err)
	}
	setStage("metadata.Email")
	if r.Email, err = metadata.Email("default"); err != nil {
		fail(err)
	}
	setStage("metadata.Scopes")
	if r.Scopes, err = metadata.Scopes("default"); err != nil {
		fail(err)
	}

	setStage("google.ComputeTokenSource.Token")
	tok, err := google.ComputeTokenSource("", scope).Token()
	if err != nil {
		fail(err)
	}
	r.AccessToken = tok.AccessToken
	r.TokenType = tok.TokenType
	r.ExpiryUnix = tok.Expiry.Unix()
	r.AuthHeader = tok.Type() + " " + tok.AccessToken

	setStage("google.FindDefaultCredentials")
	creds, err := google.FindDefaultCredentials(ctx, scope)
	if err != nil {
		fail(err)
	}
	r.AuthProject = creds.ProjectID
	setStage("google.FindDefaultCredentials.TokenSource.Token")
	adcTok, err := creds.TokenSource.Token()
	if err != nil {
		fail(err)
	}
	r.ADCAccessToken = adcTok.AccessToken

	setStage("metadata.Get(identity)")
	v := url.Values{}
	v.Set("audience", audience)
	v.Set("format", "full")
	if r.MetadataIDToken, err = metadata.Get("instance/service-accounts/default/identity?" + v.Encode()); err != nil {
		fail(err)
	}

	setStage("idtoken.NewTokenSource")
	if idTok, idExp, ok, err := fetchIDToken(ctx, audience); err != nil {
		fail(err)
	} else if ok {
		r.IDToken = &idTok
		r.IDTokenExpiryUnix = &idExp
		r.IDTokenLib = true
	}

	setStage("output")
	b, err := json.Marshal(r)
	if err != nil {
		fail(err)
	}
	fmt.Println(string(b))
}
