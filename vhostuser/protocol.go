package vhostuser

import (
	"errors"
	"strconv"
)

// Sentinel errors. Every error returned by this package wraps one of them,
// with the message and the field at fault named in the text.
var (
	// ErrInvalidMessage: a front-end message that breaks the vhost-user
	// framing or payload rules (unknown request, wrong size, bad field,
	// wrong number of fds). It ends the connection.
	ErrInvalidMessage = errors.New("vhostuser: invalid message")
	// ErrDisconnected: the peer closed the socket, possibly mid-message.
	ErrDisconnected = errors.New("vhostuser: disconnected")
	// ErrUnsupported: a well-formed request for something this back-end
	// does not implement or did not offer (a feature bit, polling mode).
	ErrUnsupported = errors.New("vhostuser: unsupported")
	// ErrState: a well-formed request that is not valid in the current
	// session state (e.g. SET_VRING_NUM on a started ring).
	ErrState = errors.New("vhostuser: request out of state")
	// ErrGuestMemory: guest memory could not be mapped, or a ring does not
	// lie inside it, or touching it faulted (SIGBUS).
	ErrGuestMemory = errors.New("vhostuser: guest memory")
	// ErrInvalidOptions: Options passed to Serve/ServeConn are unusable.
	ErrInvalidOptions = errors.New("vhostuser: invalid options")
)

// errRefused marks a request the back-end declines without ending the
// session: the front-end gets a non-zero REPLY_ACK status (vhost-user spec,
// "VHOST_USER_PROTOCOL_F_REPLY_ACK").
var errRefused = errors.New("vhostuser: request refused")

// Request is a front-end request code (vhost-user spec, "Front-end message
// types"). Only the codes this back-end implements are named.
type Request uint32

// Front-end request codes; the spec name is in each comment.
const (
	ReqGetFeatures         Request = 1  // VHOST_USER_GET_FEATURES
	ReqSetFeatures         Request = 2  // VHOST_USER_SET_FEATURES
	ReqSetOwner            Request = 3  // VHOST_USER_SET_OWNER
	ReqResetOwner          Request = 4  // VHOST_USER_RESET_OWNER
	ReqSetMemTable         Request = 5  // VHOST_USER_SET_MEM_TABLE
	ReqSetLogBase          Request = 6  // VHOST_USER_SET_LOG_BASE
	ReqSetLogFD            Request = 7  // VHOST_USER_SET_LOG_FD
	ReqSetVringNum         Request = 8  // VHOST_USER_SET_VRING_NUM
	ReqSetVringAddr        Request = 9  // VHOST_USER_SET_VRING_ADDR
	ReqSetVringBase        Request = 10 // VHOST_USER_SET_VRING_BASE
	ReqGetVringBase        Request = 11 // VHOST_USER_GET_VRING_BASE
	ReqSetVringKick        Request = 12 // VHOST_USER_SET_VRING_KICK
	ReqSetVringCall        Request = 13 // VHOST_USER_SET_VRING_CALL
	ReqSetVringErr         Request = 14 // VHOST_USER_SET_VRING_ERR
	ReqGetProtocolFeatures Request = 15 // VHOST_USER_GET_PROTOCOL_FEATURES
	ReqSetProtocolFeatures Request = 16 // VHOST_USER_SET_PROTOCOL_FEATURES
	ReqGetQueueNum         Request = 17 // VHOST_USER_GET_QUEUE_NUM
	ReqSetVringEnable      Request = 18 // VHOST_USER_SET_VRING_ENABLE
	ReqSetBackendReqFD     Request = 21 // VHOST_USER_SET_BACKEND_REQ_FD (formerly SET_SLAVE_REQ_FD)
	ReqGetConfig           Request = 24 // VHOST_USER_GET_CONFIG
	ReqSetConfig           Request = 25 // VHOST_USER_SET_CONFIG
	ReqGetInflightFD       Request = 31 // VHOST_USER_GET_INFLIGHT_FD
	ReqSetInflightFD       Request = 32 // VHOST_USER_SET_INFLIGHT_FD
	ReqResetDevice         Request = 34 // VHOST_USER_RESET_DEVICE
	ReqGetMaxMemSlots      Request = 36 // VHOST_USER_GET_MAX_MEM_SLOTS
	ReqAddMemReg           Request = 37 // VHOST_USER_ADD_MEM_REG
	ReqRemMemReg           Request = 38 // VHOST_USER_REM_MEM_REG
	ReqSetStatus           Request = 39 // VHOST_USER_SET_STATUS
	ReqGetStatus           Request = 40 // VHOST_USER_GET_STATUS
)

// String returns the spec name of a request, for logs.
func (r Request) String() string {
	if s, ok := msgTable[r]; ok {
		return s.name
	}
	return "VHOST_USER_REQUEST(" + strconv.FormatUint(uint64(r), 10) + ")"
}

// Framing constants (vhost-user spec, "Message Specification", "Header").
const (
	HeaderSize     = 12     // u32 request, u32 flags, u32 size
	MaxPayloadSize = 0x1000 // rust-vmm MAX_MSG_SIZE; every payload we accept is far smaller
	MaxFDs         = 8      // VHOST_MEMORY_BASELINE_NREGIONS: the most any accepted message carries

	hdrRequestOff = 0
	hdrFlagsOff   = 4
	hdrSizeOff    = 8

	FlagVersion     = 0x1 // bits 0-1: protocol version, always 1
	FlagVersionMask = 0x3
	FlagReply       = 0x4 // bit 2: this is a reply
	FlagNeedReply   = 0x8 // bit 3: REPLY_ACK requested
)

// Payload layouts (vhost-user spec, "Payload"; sizes checked against
// <linux/vhost.h>, see vhost-user.md §1.2). All fields little-endian on the
// machines we support ("machine native byte order").
const (
	U64Size = 8

	VringStateSize = 8 // u32 index, u32 num
	vsIndexOff     = 0
	vsNumOff       = 4

	VringAddrSize = 40 // u32 index, u32 flags, u64 desc, u64 used, u64 avail, u64 log
	vaIndexOff    = 0
	vaFlagsOff    = 4
	vaDescOff     = 8
	vaUsedOff     = 16
	vaAvailOff    = 24
	vaLogOff      = 32

	MaxMemRegions  = 8  // VHOST_MEMORY_BASELINE_NREGIONS
	memHeaderSize  = 8  // u32 nregions, u32 padding
	MemRegionSize  = 32 // u64 gpa, u64 size, u64 uaddr, u64 mmap_offset
	mtNumOff       = 0
	mrGuestAddrOff = 0
	mrSizeOff      = 8
	mrUserAddrOff  = 16
	mrMmapOffOff   = 24

	// ADD_MEM_REG / REM_MEM_REG: u64 padding, then one region.
	SingleMemRegionSize = 8 + MemRegionSize

	// SET_LOG_BASE: u64 mmap_size, u64 mmap_offset.
	LogMsgSize     = 16
	logMmapSizeOff = 0
	logMmapOffOff  = 8

	ConfigHeaderSize = 12  // u32 offset, u32 size, u32 flags
	MaxConfigSize    = 256 // VHOST_USER_MAX_CONFIG_SIZE
	cfgOffsetOff     = 0
	cfgSizeOff       = 4
	cfgFlagsOff      = 8

	// SET_VRING_KICK/CALL/ERR u64: bits 0-7 ring index, bit 8 "no fd".
	VringIndexMask = 0xff
	VringNoFDFlag  = 0x100

	// VHOST_VRING_F_LOG in SET_VRING_ADDR flags.
	vringFlagLog = 0x1

	// GET/SET_INFLIGHT_FD: u64 mmap_size, u64 mmap_offset, u16
	// num_queues, u16 queue_size, 4 bytes of padding (vhost-user.md
	// §1.2; libvhost-user checks size == sizeof = 24).
	InflightMsgSize = 24
	ifMmapSizeOff   = 0
	ifMmapOffsetOff = 8
	ifNumQueuesOff  = 16
	ifQueueSizeOff  = 18
)

// Virtio feature bits (VIRTIO 1.2 §6 "Reserved Feature Bits"; bit 30 is
// re-used by vhost-user, spec "Feature bits").
const (
	FeatureLogAll           = 1 << 26 // VHOST_F_LOG_ALL
	FeatureIndirectDesc     = 1 << 28 // VIRTIO_RING_F_INDIRECT_DESC
	FeatureEventIdx         = 1 << 29 // VIRTIO_RING_F_EVENT_IDX
	FeatureProtocolFeatures = 1 << 30 // VHOST_USER_F_PROTOCOL_FEATURES
	FeatureVersion1         = 1 << 32 // VIRTIO_F_VERSION_1
	FeatureRingPacked       = 1 << 34 // VIRTIO_F_RING_PACKED
)

// Protocol feature bits (vhost-user spec, "Protocol features"). Bits >= 20
// have moved between spec revisions and are never offered (vhost-user.md §1.5).
const (
	ProtoMQ                = 1 << 0  // VHOST_USER_PROTOCOL_F_MQ
	ProtoLogShmfd          = 1 << 1  // VHOST_USER_PROTOCOL_F_LOG_SHMFD
	ProtoReplyAck          = 1 << 3  // VHOST_USER_PROTOCOL_F_REPLY_ACK
	ProtoBackendReq        = 1 << 5  // VHOST_USER_PROTOCOL_F_BACKEND_REQ (formerly SLAVE_REQ)
	ProtoConfig            = 1 << 9  // VHOST_USER_PROTOCOL_F_CONFIG
	ProtoInflightShmfd     = 1 << 12 // VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD
	ProtoResetDevice       = 1 << 13 // VHOST_USER_PROTOCOL_F_RESET_DEVICE
	ProtoConfigureMemSlots = 1 << 15 // VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS
	ProtoStatus            = 1 << 16 // VHOST_USER_PROTOCOL_F_STATUS

	// ProtocolFeatures is what the back-end offers in GET_PROTOCOL_FEATURES.
	ProtocolFeatures = ProtoMQ | ProtoLogShmfd | ProtoReplyAck | ProtoBackendReq | ProtoConfig | ProtoInflightShmfd | ProtoResetDevice | ProtoConfigureMemSlots | ProtoStatus
)

// MaxMemSlots is the GET_MAX_MEM_SLOTS answer: the most regions ADD_MEM_REG
// may build up (libvhost-user and rust-vmm answer the same 509; QEMU uses
// at most 512 and refuses a back-end whose answer shrinks across
// reconnects, so it must never change).
const MaxMemSlots = 509

// MaxQueueSize is the largest split ring (VIRTIO 1.2 §2.7 "Queue Size ...
// maximum 32768").
const MaxQueueSize = 32768

// MaxQueues bounds Options.NumQueues and is its default. QEMU's
// vhost-user-blk-pci asks by default for one queue per vCPU
// (virtio_pci_optimal_num_queues: min(vCPUs, 2047 MSI-X vectors,
// VIRTIO_QUEUE_MAX)) and accepts num-queues up to VIRTIO_QUEUE_MAX = 1024,
// but SET_VRING_KICK/CALL/ERR carry the ring index in 8 bits
// (VHOST_USER_VRING_IDX_MASK), so a front-end can address only 256 rings:
// offering more would let ring 256's fds land on ring 0. With more than 256
// vCPUs QEMU stops with "The maximum number of queues supported by the
// backend is 256" and num-queues must be set.
const MaxQueues = 256
