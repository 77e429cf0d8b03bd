// Package virtqueue gives the device side of a virtio queue access to guest
// memory shared by a vhost-user front-end.
//
// Contract used by the other packages (owners keep it stable):
//
//	type Region struct {
//	    GuestPhysAddr uint64 // guest-physical start address
//	    UserAddr      uint64 // the front-end's virtual address of the same memory
//	    Data          []byte // our mapping; len(Data) is the region size
//	}
//	func NewMemory(regions []Region) (*Memory, error) // validates: non-empty, no overflow, no overlap
//	func (m *Memory) GuestSlices(dst [][]byte, gpa uint64, n uint32) ([][]byte, error) // appends, may span regions
//	func (m *Memory) ReadGuest(p []byte, gpa uint64) error
//	func (m *Memory) WriteGuest(p []byte, gpa uint64) error
//	func (m *Memory) UserSlice(uva uint64, n uint64) ([]byte, error) // contiguous, for ring structures
//
//	type QueueConfig struct {
//	    Size                                      uint16 // power of two, 1..32768
//	    DescUserAddr, AvailUserAddr, UsedUserAddr uint64 // front-end virtual addresses (SET_VRING_ADDR)
//	    EventIdx                                  bool   // VIRTIO_RING_F_EVENT_IDX negotiated
//	    NextAvail                                 uint16 // from SET_VRING_BASE
//	}
//	func NewSplitQueue(mem *Memory, cfg QueueConfig) (*SplitQueue, error)
//	type Chain struct {
//	    Head     uint16
//	    Readable [][]byte // device-readable buffers, in order (reused between calls)
//	    Writable [][]byte // device-writable buffers, in order (reused between calls)
//	    Err      error    // non-nil: malformed chain; complete Head with used length 0
//	}
//	func (q *SplitQueue) Next(c *Chain) (bool, error) // false: ring empty; error: ring broken (sticky)
//	func (q *SplitQueue) PushUsed(head uint16, written uint32) error
//	func (q *SplitQueue) NeedsNotification() bool        // after PushUsed batch; honours EVENT_IDX / NO_INTERRUPT
//	func (q *SplitQueue) EnableNotifications() (bool, error) // re-arm kicks; true if work arrived meanwhile
//	func (q *SplitQueue) DisableNotifications()
//	func (q *SplitQueue) NextAvail() uint16              // for GET_VRING_BASE
package virtqueue
