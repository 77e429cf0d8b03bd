package vhostuser_test

import (
	"strings"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser/frontend"
)

// drainMessages returns what MessageHandled reported so far.
func drainMessages(r *recorder) []string {
	var got []string
	for {
		select {
		case m := <-r.messages:
			got = append(got, m)
		default:
			return got
		}
	}
}

// The message trace (MessageEvents) is how a failed reconnect shows where
// the front-end stopped: every message is reported once handled, in the
// order it came, and the one that ended the connection carries its error.
func TestEveryFrontEndMessageIsReportedInOrderWithItsOutcome(t *testing.T) {
	s := startServer(t, 1)
	f := s.connect(t, frontend.Options{})
	// A request with a reply is handled, and reported, before its reply.
	if _, err := f.GetFeatures(); err != nil {
		t.Fatal(err)
	}
	got := drainMessages(s.ev)
	for _, want := range []string{"GET_FEATURES", "SET_OWNER", "SET_MEM_TABLE", "SET_VRING_KICK", "SET_VRING_CALL"} {
		if !containsPrefix(got, want) {
			t.Errorf("trace of the start sequence %q lacks %s", got, want)
		}
	}
	if len(got) == 0 || got[len(got)-1] != "GET_FEATURES" {
		t.Errorf("trace %q does not end with the GET_FEATURES just answered", got)
	}
	kick := indexPrefix(got, "SET_VRING_KICK")
	if call := lastIndexPrefix(got, "SET_VRING_CALL"); kick < 0 || call < kick {
		t.Errorf("trace %q: SET_VRING_CALL not after SET_VRING_KICK, as the front-end sent them", got)
	}
	// A message that ends the connection is reported with its error.
	if err := f.SetVringNum(vhostuser.MaxQueues+5, 128); err == nil {
		t.Log("SET_VRING_NUM of a ring that does not exist was answered")
	}
	s.waitClosed(t)
	got = drainMessages(s.ev)
	if len(got) != 1 || !strings.HasPrefix(got[0], "SET_VRING_NUM: ") {
		t.Errorf("after the bad SET_VRING_NUM the trace is %q, want that message with its error", got)
	}
}

func containsPrefix(list []string, p string) bool { return indexPrefix(list, p) >= 0 }

func indexPrefix(list []string, p string) int {
	for i, s := range list {
		if strings.HasPrefix(s, p) {
			return i
		}
	}
	return -1
}

func lastIndexPrefix(list []string, p string) int {
	for i := len(list) - 1; i >= 0; i-- {
		if strings.HasPrefix(list[i], p) {
			return i
		}
	}
	return -1
}
