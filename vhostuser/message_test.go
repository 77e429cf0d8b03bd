package vhostuser

import (
	"errors"
	"testing"
)

func msg(req Request, flags uint32, payload []byte) []byte {
	b := AppendHeader(nil, Header{Request: req, Flags: flags, Size: uint32(len(payload))})
	return append(b, payload...)
}

func u64(v uint64) []byte { return le.AppendUint64(nil, v) }

func TestDecodeMessageAppliesTheMessageTable(t *testing.T) {
	oneRegion := AppendMemTable(nil, []MemRegion{{GuestPhysAddr: 0, Size: 4096, UserAddr: 1 << 40}})
	twoRegions := AppendMemTable(nil, []MemRegion{{Size: 4096}, {GuestPhysAddr: 1 << 20, Size: 4096}})
	cfg := AppendConfig(nil, ConfigMsg{Offset: 0, Data: make([]byte, 60)})
	badCfg := append([]byte(nil), cfg...)
	le.PutUint32(badCfg[cfgSizeOff:], 61)
	inflight := AppendInflight(nil, InflightMsg{MmapSize: 4224, NumQueues: 2, QueueSize: 128})
	logMsg := AppendLog(nil, LogMsg{MmapSize: 4096})
	oneReg := AppendMemRegion(nil, MemRegion{GuestPhysAddr: 1 << 32, Size: 1 << 28, UserAddr: 1 << 40})
	const v = FlagVersion
	cases := []struct {
		name string
		b    []byte
		nfds int
		want error // nil: accepted
	}{
		{"GET_FEATURES", msg(ReqGetFeatures, v, nil), 0, nil},
		{"GET_FEATURES with NEED_REPLY", msg(ReqGetFeatures, v|FlagNeedReply, nil), 0, nil},
		{"SET_FEATURES", msg(ReqSetFeatures, v, u64(1)), 0, nil},
		{"SET_MEM_TABLE one region one fd", msg(ReqSetMemTable, v, oneRegion), 1, nil},
		{"SET_MEM_TABLE two regions two fds", msg(ReqSetMemTable, v, twoRegions), 2, nil},
		{"SET_VRING_KICK with fd", msg(ReqSetVringKick, v, u64(3)), 1, nil},
		{"SET_VRING_CALL no-fd flag and no fd", msg(ReqSetVringCall, v, u64(VringNoFDFlag|1)), 0, nil},
		{"GET_CONFIG 60 bytes", msg(ReqGetConfig, v, cfg), 0, nil},
		{"GET_INFLIGHT_FD", msg(ReqGetInflightFD, v, inflight), 0, nil},
		{"SET_INFLIGHT_FD with one fd", msg(ReqSetInflightFD, v, inflight), 1, nil},
		{"SET_LOG_BASE with one fd", msg(ReqSetLogBase, v, logMsg), 1, nil},
		{"SET_LOG_FD with one fd", msg(ReqSetLogFD, v, nil), 1, nil},
		{"GET_MAX_MEM_SLOTS", msg(ReqGetMaxMemSlots, v, nil), 0, nil},
		{"ADD_MEM_REG with one fd", msg(ReqAddMemReg, v, oneReg), 1, nil},
		{"REM_MEM_REG without fd", msg(ReqRemMemReg, v, oneReg), 0, nil},
		{"REM_MEM_REG with the old QEMU's fd", msg(ReqRemMemReg, v, oneReg), 1, nil},

		{"short header", msg(ReqGetFeatures, v, nil)[:11], 0, ErrInvalidMessage},
		{"unknown request 0", msg(0, v, nil), 0, ErrInvalidMessage},
		{"unknown request GPU_SET_SOCKET", msg(33, v, nil), 1, ErrInvalidMessage},
		{"SET_LOG_BASE 8 bytes", msg(ReqSetLogBase, v, make([]byte, 8)), 1, ErrInvalidMessage},
		{"SET_LOG_BASE without fd", msg(ReqSetLogBase, v, logMsg), 0, ErrInvalidMessage},
		{"SET_LOG_FD without fd", msg(ReqSetLogFD, v, nil), 0, ErrInvalidMessage},
		{"SET_LOG_FD with payload", msg(ReqSetLogFD, v, u64(0)), 1, ErrInvalidMessage},
		{"ADD_MEM_REG without fd", msg(ReqAddMemReg, v, oneReg), 0, ErrInvalidMessage},
		{"ADD_MEM_REG with two fds", msg(ReqAddMemReg, v, oneReg), 2, ErrInvalidMessage},
		{"ADD_MEM_REG 32 bytes (no padding word)", msg(ReqAddMemReg, v, oneReg[8:]), 1, ErrInvalidMessage},
		{"ADD_MEM_REG size 0", msg(ReqAddMemReg, v, AppendMemRegion(nil, MemRegion{})), 1, ErrInvalidMessage},
		{"ADD_MEM_REG guest range wraps", msg(ReqAddMemReg, v, AppendMemRegion(nil, MemRegion{GuestPhysAddr: ^uint64(0) - 4095, Size: 8192})), 1, ErrInvalidMessage},
		{"ADD_MEM_REG mmap_offset wraps", msg(ReqAddMemReg, v, AppendMemRegion(nil, MemRegion{MmapOffset: ^uint64(0), Size: 4096})), 1, ErrInvalidMessage},
		{"REM_MEM_REG with two fds", msg(ReqRemMemReg, v, oneReg), 2, ErrInvalidMessage},
		{"GET_MAX_MEM_SLOTS with payload", msg(ReqGetMaxMemSlots, v, u64(0)), 0, ErrInvalidMessage},
		{"version 0", msg(ReqGetFeatures, 0, nil), 0, ErrInvalidMessage},
		{"reserved flag bit", msg(ReqGetFeatures, v|0x10, nil), 0, ErrInvalidMessage},
		{"payload on GET_FEATURES", msg(ReqGetFeatures, v, u64(0)), 0, ErrInvalidMessage},
		{"fd on SET_FEATURES", msg(ReqSetFeatures, v, u64(1)), 1, ErrInvalidMessage},
		{"SET_MEM_TABLE one region two fds", msg(ReqSetMemTable, v, oneRegion), 2, ErrInvalidMessage},
		{"SET_MEM_TABLE one region no fd", msg(ReqSetMemTable, v, oneRegion), 0, ErrInvalidMessage},
		{"SET_MEM_TABLE count disagrees with size", msg(ReqSetMemTable, v, append(oneRegion[:0:0], twoRegions[:8+32]...)), 1, ErrInvalidMessage},
		{"SET_MEM_TABLE size not a region multiple", msg(ReqSetMemTable, v, append(oneRegion, 0)), 1, ErrInvalidMessage},
		{"SET_VRING_KICK reserved bits", msg(ReqSetVringKick, v, u64(1<<9)), 1, ErrInvalidMessage},
		{"SET_VRING_ERR no fd without flag", msg(ReqSetVringErr, v, u64(0)), 0, ErrInvalidMessage},
		{"GET_CONFIG size field too big", msg(ReqGetConfig, v, badCfg), 0, ErrInvalidMessage},
		{"GET_CONFIG size above 256", msg(ReqGetConfig, v, AppendConfig(nil, ConfigMsg{Data: make([]byte, 257)})), 0, ErrInvalidMessage},
		{"GET_INFLIGHT_FD 20 bytes", msg(ReqGetInflightFD, v, inflight[:20]), 0, ErrInvalidMessage},
		{"GET_INFLIGHT_FD with an fd", msg(ReqGetInflightFD, v, inflight), 1, ErrInvalidMessage},
		{"SET_INFLIGHT_FD without fd", msg(ReqSetInflightFD, v, inflight), 0, ErrInvalidMessage},
		{"SET_INFLIGHT_FD with two fds", msg(ReqSetInflightFD, v, inflight), 2, ErrInvalidMessage},
		{"payload shorter than size", msg(ReqSetFeatures, v, u64(1))[:15], 0, ErrDisconnected},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, _, err := decodeMessage(tc.b, tc.nfds)
			if tc.want == nil && err != nil {
				t.Fatalf("rejected: %v", err)
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want %v", err, tc.want)
			}
		})
	}
}

func TestParseMemTableRejectsEmptyAndWrappingRegions(t *testing.T) {
	const max = ^uint64(0)
	for _, tc := range []struct {
		name string
		r    MemRegion
	}{
		{"zero size", MemRegion{Size: 0}},
		{"guest address wraps", MemRegion{GuestPhysAddr: max - 10, Size: 4096}},
		{"user address wraps", MemRegion{UserAddr: max - 10, Size: 4096}},
		{"mmap offset wraps", MemRegion{MmapOffset: max - 10, Size: 4096}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParseMemTable(AppendMemTable(nil, []MemRegion{tc.r})); !errors.Is(err, ErrInvalidMessage) {
				t.Fatalf("err = %v, want ErrInvalidMessage", err)
			}
		})
	}
}

// FuzzDecodeMessage feeds arbitrary bytes and fd counts to the header and
// payload validators and the typed decoders: none may panic, and whatever
// decodeMessage accepts must satisfy the table's size and fd rules.
func FuzzDecodeMessage(f *testing.F) {
	f.Add(msg(ReqGetFeatures, FlagVersion, nil), uint8(0))
	f.Add(msg(ReqSetMemTable, FlagVersion, AppendMemTable(nil, []MemRegion{{Size: 4096}})), uint8(1))
	f.Add(msg(ReqSetVringAddr, FlagVersion, AppendVringAddr(nil, VringAddr{Desc: 16})), uint8(0))
	f.Add(msg(ReqSetVringKick, FlagVersion, u64(VringNoFDFlag)), uint8(0))
	f.Add(msg(ReqGetConfig, FlagVersion|FlagNeedReply, AppendConfig(nil, ConfigMsg{Data: make([]byte, 8)})), uint8(0))
	f.Add(msg(ReqSetVringNum, FlagVersion, AppendVringState(nil, VringState{Num: 256})), uint8(0))
	f.Add(msg(ReqAddMemReg, FlagVersion, AppendMemRegion(nil, MemRegion{GuestPhysAddr: 1 << 32, Size: 1 << 20})), uint8(1))
	f.Add(msg(ReqRemMemReg, FlagVersion|FlagNeedReply, AppendMemRegion(nil, MemRegion{Size: 4096})), uint8(0))
	f.Add(msg(ReqSetLogBase, FlagVersion, AppendLog(nil, LogMsg{MmapSize: 4096, MmapOffset: 1 << 63})), uint8(1))
	f.Add(msg(ReqSetLogFD, FlagVersion, nil), uint8(1))
	f.Fuzz(func(t *testing.T, b []byte, nfds uint8) {
		n := int(nfds % (MaxFDs + 2))
		h, p, err := decodeMessage(b, n)
		if err != nil {
			return
		}
		spec := msgTable[h.Request]
		if len(p) != int(h.Size) || len(p) > MaxPayloadSize {
			t.Fatalf("accepted payload of %d bytes for size %d", len(p), h.Size)
		}
		if spec.fds == fdNone && n != 0 {
			t.Fatalf("accepted %d fds on %s", n, spec.name)
		}
		switch h.Request {
		case ReqSetMemTable:
			r, err := ParseMemTable(p)
			if err != nil || len(r) != n {
				t.Fatalf("accepted SET_MEM_TABLE: %d regions, %d fds, %v", len(r), n, err)
			}
		case ReqGetConfig, ReqSetConfig:
			if _, err := ParseConfig(p); err != nil {
				t.Fatalf("accepted config that does not parse: %v", err)
			}
		case ReqSetVringAddr:
			if _, err := ParseVringAddr(p); err != nil {
				t.Fatal(err)
			}
		case ReqSetVringNum, ReqSetVringBase, ReqGetVringBase, ReqSetVringEnable:
			if _, err := ParseVringState(p); err != nil {
				t.Fatal(err)
			}
		}
	})
}
