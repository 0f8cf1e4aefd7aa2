// Command go_baseline is the Go peers' stack at its floor: net/http answering fixed bytes and
// headers for a few request targets (metaemu's own answers, copied by benchmarks/throughput.py),
// nothing else. gke-metadata-server and gce_metadata_server are built on net/http; this is what
// any handler on it costs at least. The spec arrives as JSON on stdin; the bound port is printed.
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
)

type route struct {
	Body    []byte            `json:"body"` // base64 in the JSON
	Headers map[string]string `json:"headers"`
}

func main() {
	var routes map[string]route
	if err := json.NewDecoder(os.Stdin).Decode(&routes); err != nil {
		fmt.Fprintln(os.Stderr, "go_baseline: bad spec:", err)
		os.Exit(2)
	}
	headers := make(map[string]http.Header, len(routes))
	for target, r := range routes {
		h := http.Header{}
		for k, v := range r.Headers {
			h[k] = []string{v} // as given: metaemu's exact names (ETag, not Etag)
		}
		headers[target] = h
	}
	handler := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		target := req.URL.RequestURI()
		r, ok := routes[target]
		if !ok {
			http.NotFound(w, req)
			return
		}
		out := w.Header()
		for k, v := range headers[target] {
			out[k] = v
		}
		_, _ = w.Write(r.Body)
	})
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, "go_baseline:", err)
		os.Exit(1)
	}
	fmt.Println(listener.Addr().(*net.TCPAddr).Port)
	if err := http.Serve(listener, handler); err != nil {
		fmt.Fprintln(os.Stderr, "go_baseline:", err)
		os.Exit(1)
	}
}
