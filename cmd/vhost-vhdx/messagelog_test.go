package main

import (
	"bytes"
	"errors"
	"strings"
	"testing"

	"github.com/sirupsen/logrus"
)

// The control-channel trace is a debug-level line per message, with the
// error of a message that ended the connection; at the default level it
// costs nothing and prints nothing.
func TestVhostUserMessagesAreLoggedOnlyAtDebugLevel(t *testing.T) {
	for _, tc := range []struct {
		level logrus.Level
		want  []string
	}{
		{logrus.InfoLevel, nil},
		{logrus.DebugLevel, []string{"request=SET_VRING_KICK", "request=SET_VRING_NUM", "ring 300 out of range"}},
	} {
		var out bytes.Buffer
		log := logrus.New()
		log.SetOutput(&out)
		log.SetLevel(tc.level)
		ev := newLogEvents(logrus.NewEntry(log))
		ev.MessageHandled(1, "SET_VRING_KICK", nil)
		ev.MessageHandled(1, "SET_VRING_NUM", errors.New("ring 300 out of range"))
		if tc.want == nil && out.Len() != 0 {
			t.Errorf("level %v: logged %q", tc.level, out.String())
		}
		for _, w := range tc.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("level %v: log %q lacks %q", tc.level, out.String(), w)
			}
		}
	}
}
