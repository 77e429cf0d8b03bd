package vhostuser

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"
)

var le = binary.LittleEndian

// Header is the 12-byte vhost-user message header.
type Header struct {
	Request Request
	Flags   uint32
	Size    uint32 // payload bytes that follow the header
}

// ParseHeader decodes a header from the first HeaderSize bytes of b. It does
// no validation; see the message table.
func ParseHeader(b []byte) (Header, error) {
	if len(b) < HeaderSize {
		return Header{}, fmt.Errorf("header: %d bytes, want %d: %w", len(b), HeaderSize, ErrInvalidMessage)
	}
	return Header{
		Request: Request(le.Uint32(b[hdrRequestOff:])),
		Flags:   le.Uint32(b[hdrFlagsOff:]),
		Size:    le.Uint32(b[hdrSizeOff:]),
	}, nil
}

// AppendHeader appends the wire form of h to b.
func AppendHeader(b []byte, h Header) []byte {
	b = le.AppendUint32(b, uint32(h.Request))
	b = le.AppendUint32(b, h.Flags)
	return le.AppendUint32(b, h.Size)
}

// VringState is the payload of SET_VRING_NUM/BASE/ENABLE and GET_VRING_BASE.
type VringState struct{ Index, Num uint32 }

// AppendVringState appends the wire form of s to b.
func AppendVringState(b []byte, s VringState) []byte {
	b = le.AppendUint32(b, s.Index)
	return le.AppendUint32(b, s.Num)
}

// ParseVringState decodes a VringStateSize payload.
func ParseVringState(p []byte) (VringState, error) {
	if len(p) != VringStateSize {
		return VringState{}, fmt.Errorf("vring state: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	return VringState{Index: le.Uint32(p[vsIndexOff:]), Num: le.Uint32(p[vsNumOff:])}, nil
}

// VringAddr is the payload of SET_VRING_ADDR. Desc, Used and Avail are
// front-end virtual addresses (vhost-user spec, "A vring address
// description").
type VringAddr struct {
	Index, Flags           uint32
	Desc, Used, Avail, Log uint64
}

// AppendVringAddr appends the wire form of a to b.
func AppendVringAddr(b []byte, a VringAddr) []byte {
	b = le.AppendUint32(b, a.Index)
	b = le.AppendUint32(b, a.Flags)
	b = le.AppendUint64(b, a.Desc)
	b = le.AppendUint64(b, a.Used)
	b = le.AppendUint64(b, a.Avail)
	return le.AppendUint64(b, a.Log)
}

// ParseVringAddr decodes a VringAddrSize payload.
func ParseVringAddr(p []byte) (VringAddr, error) {
	if len(p) != VringAddrSize {
		return VringAddr{}, fmt.Errorf("vring addr: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	return VringAddr{
		Index: le.Uint32(p[vaIndexOff:]),
		Flags: le.Uint32(p[vaFlagsOff:]),
		Desc:  le.Uint64(p[vaDescOff:]),
		Used:  le.Uint64(p[vaUsedOff:]),
		Avail: le.Uint64(p[vaAvailOff:]),
		Log:   le.Uint64(p[vaLogOff:]),
	}, nil
}

// MemRegion is one entry of SET_MEM_TABLE (vhost-user spec, "Memory
// regions description").
type MemRegion struct {
	GuestPhysAddr, Size, UserAddr, MmapOffset uint64
}

// AppendMemTable appends a SET_MEM_TABLE payload for regions to b.
func AppendMemTable(b []byte, regions []MemRegion) []byte {
	b = le.AppendUint32(b, uint32(len(regions)))
	b = le.AppendUint32(b, 0)
	for _, r := range regions {
		b = appendRegion(b, r)
	}
	return b
}

// appendRegion appends one memory region's wire form, the same in
// SET_MEM_TABLE and in ADD_MEM_REG / REM_MEM_REG.
func appendRegion(b []byte, r MemRegion) []byte {
	b = le.AppendUint64(b, r.GuestPhysAddr)
	b = le.AppendUint64(b, r.Size)
	b = le.AppendUint64(b, r.UserAddr)
	return le.AppendUint64(b, r.MmapOffset)
}

// decodeRegion reads one memory region (MemRegionSize bytes of b); the
// caller checks it.
func decodeRegion(b []byte) MemRegion {
	return MemRegion{
		GuestPhysAddr: le.Uint64(b[mrGuestAddrOff:]),
		Size:          le.Uint64(b[mrSizeOff:]),
		UserAddr:      le.Uint64(b[mrUserAddrOff:]),
		MmapOffset:    le.Uint64(b[mrMmapOffOff:]),
	}
}

// ParseMemTable decodes and validates a SET_MEM_TABLE payload: 1..8
// regions, the payload size matching the count, and each region non-empty
// with no address range wrapping around 2^64 (rust-vmm
// VhostUserMemoryRegion::is_valid_common).
func ParseMemTable(p []byte) ([]MemRegion, error) {
	if len(p) < memHeaderSize {
		return nil, fmt.Errorf("SET_MEM_TABLE: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	n := le.Uint32(p[mtNumOff:])
	if n < 1 || n > MaxMemRegions {
		return nil, fmt.Errorf("SET_MEM_TABLE: nregions %d not in 1..%d: %w", n, MaxMemRegions, ErrInvalidMessage)
	}
	if len(p) != memHeaderSize+int(n)*MemRegionSize {
		return nil, fmt.Errorf("SET_MEM_TABLE: size %d for nregions %d: %w", len(p), n, ErrInvalidMessage)
	}
	regions := make([]MemRegion, n)
	for i := range regions {
		r := decodeRegion(p[memHeaderSize+i*MemRegionSize:])
		if err := checkRegion(r); err != nil {
			return nil, fmt.Errorf("SET_MEM_TABLE: region %d %v: %w", i, err, ErrInvalidMessage)
		}
		regions[i] = r
	}
	return regions, nil
}

// checkRegion is the syntax of one region: non-empty, no address range
// wrapping around 2^64. The error names the field; the caller wraps it.
func checkRegion(r MemRegion) error {
	switch {
	case r.Size == 0:
		return errors.New("memory_size 0")
	case r.GuestPhysAddr > math.MaxUint64-r.Size:
		return errors.New("guest_phys_addr+size overflows")
	case r.UserAddr > math.MaxUint64-r.Size:
		return errors.New("userspace_addr+size overflows")
	case r.MmapOffset > math.MaxUint64-r.Size:
		return errors.New("mmap_offset+size overflows")
	}
	return nil
}

// AppendMemRegion appends an ADD_MEM_REG / REM_MEM_REG payload (u64
// padding, then the region) to b.
func AppendMemRegion(b []byte, r MemRegion) []byte {
	return appendRegion(le.AppendUint64(b, 0), r)
}

// ParseMemRegion decodes and validates an ADD_MEM_REG / REM_MEM_REG
// payload. The padding word is ignored, as QEMU leaves it unset.
func ParseMemRegion(p []byte) (MemRegion, error) {
	if len(p) != SingleMemRegionSize {
		return MemRegion{}, fmt.Errorf("memory region: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	r := decodeRegion(p[8:])
	if err := checkRegion(r); err != nil {
		return MemRegion{}, fmt.Errorf("memory region: %v: %w", err, ErrInvalidMessage)
	}
	return r, nil
}

func checkSingleMemRegion(p []byte) error { _, err := ParseMemRegion(p); return err }

// LogMsg is the payload of SET_LOG_BASE (vhost-user spec "Dirty log
// description").
type LogMsg struct {
	MmapSize, MmapOffset uint64
}

// AppendLog appends the wire form of l to b.
func AppendLog(b []byte, l LogMsg) []byte {
	b = le.AppendUint64(b, l.MmapSize)
	return le.AppendUint64(b, l.MmapOffset)
}

// ParseLog decodes a SET_LOG_BASE payload; mapLog validates the values.
func ParseLog(p []byte) (LogMsg, error) {
	if len(p) != LogMsgSize {
		return LogMsg{}, fmt.Errorf("log: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	return LogMsg{MmapSize: le.Uint64(p[logMmapSizeOff:]), MmapOffset: le.Uint64(p[logMmapOffOff:])}, nil
}

// ConfigMsg is the payload of GET_CONFIG and SET_CONFIG.
type ConfigMsg struct {
	Offset, Size, Flags uint32
	Data                []byte // len(Data) == Size on the wire
}

// AppendConfig appends the wire form of c to b; Size is taken from len(c.Data).
func AppendConfig(b []byte, c ConfigMsg) []byte {
	b = le.AppendUint32(b, c.Offset)
	b = le.AppendUint32(b, uint32(len(c.Data)))
	b = le.AppendUint32(b, c.Flags)
	return append(b, c.Data...)
}

// ParseConfig decodes a GET/SET_CONFIG payload: 12 header bytes and exactly
// size ≤ 256 data bytes. Data aliases p.
func ParseConfig(p []byte) (ConfigMsg, error) {
	if len(p) < ConfigHeaderSize {
		return ConfigMsg{}, fmt.Errorf("config: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	c := ConfigMsg{
		Offset: le.Uint32(p[cfgOffsetOff:]),
		Size:   le.Uint32(p[cfgSizeOff:]),
		Flags:  le.Uint32(p[cfgFlagsOff:]),
	}
	if c.Size > MaxConfigSize || uint64(len(p)) != ConfigHeaderSize+uint64(c.Size) {
		return ConfigMsg{}, fmt.Errorf("config: size field %d with %d payload bytes: %w", c.Size, len(p), ErrInvalidMessage)
	}
	c.Data = p[ConfigHeaderSize:]
	return c, nil
}

// InflightMsg is the payload of GET_INFLIGHT_FD and SET_INFLIGHT_FD
// (vhost-user spec, "Inflight description").
type InflightMsg struct {
	MmapSize, MmapOffset uint64
	NumQueues, QueueSize uint16
}

// AppendInflight appends the wire form of m to b (with the 4 padding
// bytes).
func AppendInflight(b []byte, m InflightMsg) []byte {
	b = le.AppendUint64(b, m.MmapSize)
	b = le.AppendUint64(b, m.MmapOffset)
	b = le.AppendUint16(b, m.NumQueues)
	b = le.AppendUint16(b, m.QueueSize)
	return append(b, 0, 0, 0, 0)
}

// ParseInflight decodes an InflightMsgSize payload. It does no semantic
// validation.
func ParseInflight(p []byte) (InflightMsg, error) {
	if len(p) != InflightMsgSize {
		return InflightMsg{}, fmt.Errorf("inflight: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	return InflightMsg{
		MmapSize:   le.Uint64(p[ifMmapSizeOff:]),
		MmapOffset: le.Uint64(p[ifMmapOffsetOff:]),
		NumQueues:  le.Uint16(p[ifNumQueuesOff:]),
		QueueSize:  le.Uint16(p[ifQueueSizeOff:]),
	}, nil
}

// ParseU64 decodes a u64 payload.
func ParseU64(p []byte) (uint64, error) {
	if len(p) != U64Size {
		return 0, fmt.Errorf("u64: %d bytes: %w", len(p), ErrInvalidMessage)
	}
	return le.Uint64(p), nil
}

// fdRule says how many fds a request may carry.
type fdRule uint8

const (
	fdNone      fdRule = iota // no fds
	fdPerRegion               // SET_MEM_TABLE: exactly nregions
	fdVring                   // SET_VRING_KICK/CALL/ERR: one, or none with VringNoFDFlag
	fdOne                     // SET_INFLIGHT_FD, SET_BACKEND_REQ_FD, ADD_MEM_REG, SET_LOG_BASE/FD: exactly one
	fdOptional                // REM_MEM_REG: none, or one (older QEMU sent the region's fd; it is closed)
)

// msgSpec is the syntax of one request, checked before dispatch (rust-vmm
// backend_req_handler.rs: "validate message header ... validate message
// body" before calling the device).
type msgSpec struct {
	name string
	// size is the exact payload size; if variable is set, the payload must
	// instead lie in [minSize, maxSize] and pass variable once read.
	size             int
	minSize, maxSize int
	variable         func(p []byte) error
	fds              fdRule
	proto            uint64 // protocol feature that must have been negotiated
	reply            bool   // always answered with an explicit reply body
}

func checkMemTable(p []byte) error { _, err := ParseMemTable(p); return err }
func checkConfig(p []byte) error   { _, err := ParseConfig(p); return err }

// msgTable is the single description of every request this back-end
// accepts. Anything not in it ends the connection.
var msgTable = map[Request]msgSpec{
	ReqGetFeatures:         {name: "GET_FEATURES", reply: true},
	ReqSetFeatures:         {name: "SET_FEATURES", size: U64Size},
	ReqSetOwner:            {name: "SET_OWNER"},
	ReqResetOwner:          {name: "RESET_OWNER"},
	ReqSetMemTable:         {name: "SET_MEM_TABLE", minSize: memHeaderSize + MemRegionSize, maxSize: memHeaderSize + MaxMemRegions*MemRegionSize, variable: checkMemTable, fds: fdPerRegion},
	ReqSetVringNum:         {name: "SET_VRING_NUM", size: VringStateSize},
	ReqSetVringAddr:        {name: "SET_VRING_ADDR", size: VringAddrSize},
	ReqSetVringBase:        {name: "SET_VRING_BASE", size: VringStateSize},
	ReqGetVringBase:        {name: "GET_VRING_BASE", size: VringStateSize, reply: true},
	ReqSetVringKick:        {name: "SET_VRING_KICK", size: U64Size, fds: fdVring},
	ReqSetVringCall:        {name: "SET_VRING_CALL", size: U64Size, fds: fdVring},
	ReqSetVringErr:         {name: "SET_VRING_ERR", size: U64Size, fds: fdVring},
	ReqGetProtocolFeatures: {name: "GET_PROTOCOL_FEATURES", reply: true},
	ReqSetProtocolFeatures: {name: "SET_PROTOCOL_FEATURES", size: U64Size},
	ReqGetQueueNum:         {name: "GET_QUEUE_NUM", proto: ProtoMQ, reply: true},
	ReqSetVringEnable:      {name: "SET_VRING_ENABLE", size: VringStateSize},
	ReqSetBackendReqFD:     {name: "SET_BACKEND_REQ_FD", fds: fdOne, proto: ProtoBackendReq},
	ReqGetConfig:           {name: "GET_CONFIG", minSize: ConfigHeaderSize, maxSize: ConfigHeaderSize + MaxConfigSize, variable: checkConfig, proto: ProtoConfig, reply: true},
	ReqSetConfig:           {name: "SET_CONFIG", minSize: ConfigHeaderSize, maxSize: ConfigHeaderSize + MaxConfigSize, variable: checkConfig, proto: ProtoConfig},
	ReqGetInflightFD:       {name: "GET_INFLIGHT_FD", size: InflightMsgSize, proto: ProtoInflightShmfd, reply: true},
	ReqSetInflightFD:       {name: "SET_INFLIGHT_FD", size: InflightMsgSize, fds: fdOne, proto: ProtoInflightShmfd},
	ReqResetDevice:         {name: "RESET_DEVICE", proto: ProtoResetDevice},
	ReqGetMaxMemSlots:      {name: "GET_MAX_MEM_SLOTS", proto: ProtoConfigureMemSlots, reply: true},
	ReqAddMemReg:           {name: "ADD_MEM_REG", size: SingleMemRegionSize, variable: checkSingleMemRegion, minSize: SingleMemRegionSize, maxSize: SingleMemRegionSize, fds: fdOne, proto: ProtoConfigureMemSlots},
	ReqRemMemReg:           {name: "REM_MEM_REG", size: SingleMemRegionSize, variable: checkSingleMemRegion, minSize: SingleMemRegionSize, maxSize: SingleMemRegionSize, fds: fdOptional, proto: ProtoConfigureMemSlots},
	ReqSetLogBase:          {name: "SET_LOG_BASE", size: LogMsgSize, fds: fdOne, proto: ProtoLogShmfd, reply: true},
	ReqSetLogFD:            {name: "SET_LOG_FD", fds: fdOne},
	ReqSetStatus:           {name: "SET_STATUS", size: U64Size, proto: ProtoStatus},
	ReqGetStatus:           {name: "GET_STATUS", proto: ProtoStatus, reply: true},
}

// checkHeader validates a request header before its payload is read, so
// that no buffer is ever sized from an unchecked length. nfds is the number
// of fds that arrived with the header.
func checkHeader(h Header, nfds int) (msgSpec, error) {
	spec, ok := msgTable[h.Request]
	if !ok {
		return msgSpec{}, fmt.Errorf("request %d: unknown: %w", uint32(h.Request), ErrInvalidMessage)
	}
	// Requests carry version 1 and at most NEED_REPLY; REPLY and the
	// reserved bits 4-31 must be clear (spec "Header"; rust-vmm is_valid).
	if h.Flags&FlagVersionMask != FlagVersion || h.Flags&^uint32(FlagVersionMask|FlagNeedReply) != 0 {
		return spec, fmt.Errorf("%s: flags %#x: %w", spec.name, h.Flags, ErrInvalidMessage)
	}
	if h.Size > MaxPayloadSize {
		return spec, fmt.Errorf("%s: size %d > %d: %w", spec.name, h.Size, MaxPayloadSize, ErrInvalidMessage)
	}
	if spec.variable != nil {
		if int(h.Size) < spec.minSize || int(h.Size) > spec.maxSize {
			return spec, fmt.Errorf("%s: size %d not in %d..%d: %w", spec.name, h.Size, spec.minSize, spec.maxSize, ErrInvalidMessage)
		}
	} else if int(h.Size) != spec.size {
		return spec, fmt.Errorf("%s: size %d, want %d: %w", spec.name, h.Size, spec.size, ErrInvalidMessage)
	}
	if nfds > MaxFDs || (spec.fds == fdNone && nfds != 0) {
		return spec, fmt.Errorf("%s: %d fds not allowed: %w", spec.name, nfds, ErrInvalidMessage)
	}
	return spec, nil
}

// checkBody validates a payload of the size checkHeader accepted, and the
// fd count against it (rust-vmm check_attached_files,
// handle_vring_fd_request).
func checkBody(spec msgSpec, p []byte, nfds int) error {
	if spec.variable != nil {
		if err := spec.variable(p); err != nil {
			return err
		}
	}
	switch spec.fds {
	case fdOptional:
		if nfds > 1 {
			return fmt.Errorf("%s: %d fds, want at most 1: %w", spec.name, nfds, ErrInvalidMessage)
		}
	case fdOne:
		if nfds != 1 {
			return fmt.Errorf("%s: %d fds, want 1: %w", spec.name, nfds, ErrInvalidMessage)
		}
	case fdPerRegion:
		// ParseMemTable has checked len(p) >= 8.
		if n := le.Uint32(p[mtNumOff:]); uint32(nfds) != n {
			return fmt.Errorf("%s: %d fds for %d regions: %w", spec.name, nfds, n, ErrInvalidMessage)
		}
	case fdVring:
		v := le.Uint64(p)
		if v&^uint64(VringIndexMask|VringNoFDFlag) != 0 {
			return fmt.Errorf("%s: reserved bits in %#x: %w", spec.name, v, ErrInvalidMessage)
		}
		want := 1
		if v&VringNoFDFlag != 0 {
			want = 0
		}
		if nfds != want {
			return fmt.Errorf("%s: %d fds, want %d (value %#x): %w", spec.name, nfds, want, v, ErrInvalidMessage)
		}
	}
	return nil
}

// decodeMessage checks a whole request held in b (header then payload) as
// the connection reader does, in the same order. It is the fuzzing entry
// point for the decoder and validators.
func decodeMessage(b []byte, nfds int) (Header, []byte, error) {
	h, err := ParseHeader(b)
	if err != nil {
		return h, nil, err
	}
	spec, err := checkHeader(h, nfds)
	if err != nil {
		return h, nil, err
	}
	if uint64(len(b)-HeaderSize) < uint64(h.Size) {
		return h, nil, fmt.Errorf("%s: short payload: %w", spec.name, ErrDisconnected)
	}
	p := b[HeaderSize : HeaderSize+int(h.Size)]
	if err := checkBody(spec, p, nfds); err != nil {
		return h, nil, err
	}
	return h, p, nil
}
