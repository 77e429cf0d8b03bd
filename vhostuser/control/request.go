package control

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
)

// Error classes, as QMP names them. QMP puts nearly everything under
// GenericError; CommandNotFound is the one a client may want to tell apart
// (an older daemon without the command).
const (
	ClassGeneric         = "GenericError"
	ClassCommandNotFound = "CommandNotFound"
)

// Sentinel errors of the package.
var (
	// ErrMalformed: a request line that is not one QMP-shaped JSON object.
	ErrMalformed = errors.New("control: malformed request")
	// ErrLineTooLong: a request longer than Options.MaxLine; the client is
	// disconnected after the error reply.
	ErrLineTooLong = errors.New("control: request line too long")
	// ErrInvalidArguments: arguments that do not fit the command.
	ErrInvalidArguments = errors.New("control: invalid arguments")
)

// MaxNameLen bounds a command name; names are [A-Za-z0-9_-].
const MaxNameLen = 64

// Request is one parsed request line:
//
//	{"execute": "NAME", "arguments": {...}, "id": ANY}
//
// Arguments is nil or the raw JSON object; ID is nil or the raw JSON value,
// echoed in the reply.
type Request struct {
	Execute   string
	Arguments json.RawMessage
	ID        json.RawMessage
}

// ParseRequest parses one request line (without its newline). The line
// must be exactly one JSON object whose only keys are "execute" (a command
// name, required), "arguments" (an object or null) and "id" (any value);
// keys are matched exactly, as QMP does. The returned raw fields alias
// line. Errors wrap ErrMalformed.
func ParseRequest(line []byte) (Request, error) {
	var req Request
	line = bytes.TrimSpace(line)
	if len(line) == 0 || line[0] != '{' {
		return req, fmt.Errorf("%w: a request is one JSON object per line", ErrMalformed)
	}
	if !json.Valid(line) {
		return req, fmt.Errorf("%w: not valid JSON", ErrMalformed)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(line, &obj); err != nil {
		return req, fmt.Errorf("%w: %v", ErrMalformed, err)
	}
	for k := range obj {
		switch k {
		case "execute", "arguments", "id":
		default:
			return req, fmt.Errorf("%w: unexpected key %q (want execute, arguments, id)", ErrMalformed, truncate(k, MaxNameLen))
		}
	}
	req.ID = obj["id"]
	ex, ok := obj["execute"]
	if !ok {
		return req, fmt.Errorf("%w: missing \"execute\"", ErrMalformed)
	}
	if err := json.Unmarshal(ex, &req.Execute); err != nil {
		return req, fmt.Errorf("%w: \"execute\" must be a string", ErrMalformed)
	}
	if !validName(req.Execute) {
		return req, fmt.Errorf("%w: command name %q is not 1..%d characters of [A-Za-z0-9_-]", ErrMalformed, truncate(req.Execute, MaxNameLen), MaxNameLen)
	}
	if a, ok := obj["arguments"]; ok && !bytes.Equal(a, []byte("null")) {
		if len(a) == 0 || a[0] != '{' {
			return req, fmt.Errorf("%w: \"arguments\" must be an object", ErrMalformed)
		}
		req.Arguments = a
	}
	return req, nil
}

func validName(s string) bool {
	if len(s) == 0 || len(s) > MaxNameLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
			return false
		}
	}
	return true
}

// truncate keeps error messages (and so logs and replies) short whatever
// the client sent.
func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "..."
}

// Error is an error reply: {"error": {"class": C, "desc": D}}. A command
// returning an *Error (possibly wrapped) chooses the class; any other
// error is a GenericError with the error's text.
type Error struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

func (e *Error) Error() string { return e.Class + ": " + e.Desc }

// Errorf builds an *Error.
func Errorf(class, format string, args ...any) *Error {
	return &Error{Class: class, Desc: fmt.Sprintf(format, args...)}
}

func asError(err error) *Error {
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	return &Error{Class: ClassGeneric, Desc: err.Error()}
}

// response is one reply line.
type response struct {
	Return any             `json:"return,omitempty"`
	Error  *Error          `json:"error,omitempty"`
	ID     json.RawMessage `json:"id,omitempty"`
}

// encodeReply marshals a success (ret, which must not be nil: QMP returns
// {} for "nothing") or an error reply with a trailing newline.
func encodeReply(id json.RawMessage, ret any, err error) []byte {
	r := response{ID: id}
	if err != nil {
		r.Error = asError(err)
	} else {
		if ret == nil {
			ret = struct{}{}
		}
		r.Return = ret
	}
	b, merr := json.Marshal(r)
	if merr != nil {
		b, _ = json.Marshal(response{ID: id, Error: &Error{Class: ClassGeneric, Desc: "encoding the reply: " + merr.Error()}})
	}
	return append(b, '\n')
}
