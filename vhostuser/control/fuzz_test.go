package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"testing"
)

func FuzzControlRequest(f *testing.F) {
	for _, s := range []string{
		`{"execute": "status"}`,
		`{"execute": "resize", "arguments": {"size": "+1G"}, "id": 7}`,
		`{"execute": "x", "arguments": null, "id": {"a": [1, 2]}}`,
		`{"execute": 1}`, `[]`, `{"execute": "a", "arguments": []}`, `{"EXECUTE": "a"}`,
		`{"execute": "a", "execute": "b"}`, "{\"execute\": \"\\u00e9\"}", `{`, ``, `null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		req, err := ParseRequest(line)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v does not wrap ErrMalformed", err)
			}
			// The reply to any bad line must encode.
			if b := encodeReply(req.ID, nil, err); !json.Valid(bytes.TrimSpace(b)) {
				t.Fatalf("error reply %q is not JSON", b)
			}
			return
		}
		if !validName(req.Execute) {
			t.Fatalf("accepted command name %q", req.Execute)
		}
		if req.Arguments != nil {
			var m map[string]json.RawMessage
			if err := json.Unmarshal(req.Arguments, &m); err != nil {
				t.Fatalf("accepted arguments %q that are not an object: %v", req.Arguments, err)
			}
		}
		// Re-encoding the request parses to the same request.
		re := map[string]json.RawMessage{"execute": mustJSON(t, req.Execute)}
		if req.Arguments != nil {
			re["arguments"] = req.Arguments
		}
		if req.ID != nil {
			re["id"] = req.ID
		}
		again, err := ParseRequest(mustJSON(t, re))
		if err != nil || again.Execute != req.Execute {
			t.Fatalf("re-encoded request: %+v %v", again, err)
		}
		if b := encodeReply(req.ID, map[string]int{"x": 1}, nil); !json.Valid(bytes.TrimSpace(b)) {
			t.Fatalf("reply %q is not JSON", b)
		}
	})
}

func mustJSON(t *testing.T, v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
