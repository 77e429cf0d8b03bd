package virtqueue

import "testing"

func TestNeedEvent(t *testing.T) {
	// vring_need_event(event, new, old): notify iff event is in [old, new)
	// modulo 2^16, i.e. the driver's "wake me after entry event" was
	// crossed by the indices published since the last notification.
	tests := []struct {
		name             string
		event, new_, old uint16
		want             bool
	}{
		{"event just crossed", 5, 6, 5, true},
		{"event inside a batch", 5, 10, 3, true},
		{"event at start of batch", 3, 10, 3, true},
		{"event at new index, not yet reached", 10, 10, 3, false},
		{"event already passed", 2, 10, 3, false},
		{"event far ahead", 100, 10, 3, false},
		{"nothing published", 5, 5, 5, false},
		{"batch wraps, event before 0", 65534, 2, 65530, true},
		{"batch wraps, event after 0", 1, 2, 65530, true},
		{"batch wraps, event at new", 2, 2, 65530, false},
		{"batch wraps, event behind old", 65529, 2, 65530, false},
		{"event 0xffff crossed to 0", 0xffff, 0, 0xffff, true},
		{"full window of 2^16-1 entries", 7, 6, 7, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := needEvent(tt.event, tt.new_, tt.old); got != tt.want {
				t.Errorf("needEvent(event %d, new %d, old %d) = %v, want %v", tt.event, tt.new_, tt.old, got, tt.want)
			}
		})
	}
}
