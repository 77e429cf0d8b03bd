package vhostuser

import (
	"fmt"
	"slices"

	"github.com/vhost-vhdx/vhost-vhdx/virtqueue"
)

// Memory slots (VHOST_USER_PROTOCOL_F_CONFIGURE_MEM_SLOTS, vhost-user.md
// §1.8): instead of SET_MEM_TABLE's whole table of at most 8 regions, the
// front-end adds and removes one region at a time, up to the
// GET_MAX_MEM_SLOTS answer (MaxMemSlots). Every change builds a new
// immutable table and installs it the way SET_MEM_TABLE does (installMem):
// under the dispatch lock held for writing, so no worker is inside a batch
// (every request popped before has completed, its used entry published),
// and started rings are re-translated into the new table keeping their
// positions. A removed region is unmapped after the swap and before the
// reply: once REM_MEM_REG is answered no request can read or write it, and
// a later descriptor pointing into it is a malformed chain (completed with
// length 0).
//
// Rules for hostile front-ends:
//   - ADD_MEM_REG carries exactly one fd, mapped after the same checks as a
//     SET_MEM_TABLE region (size and offsets inside the file, no wrap); a
//     region overlapping one in force (guest-physical or user range), or a
//     table growing past MaxMemSlots, ends the connection (ErrGuestMemory)
//     with the table unchanged.
//   - REM_MEM_REG names the region by guest address, size and user
//     address (mmap_offset ignored, as libvhost-user does); an fd, which
//     older QEMU sent, is accepted and closed. Removing a region that is not
//     in the table is refused (non-zero REPLY_ACK status, session kept,
//     nothing changed).
//   - Removing a region that a started ring's descriptor table, avail or
//     used ring (packed: descriptor ring and event areas) lies in is
//     refused the same way: the ring keeps running on the unchanged table.
//     QEMU never does this (it stops the device before memory under a live
//     ring goes away); stopping the ring instead would leave a guest with a
//     dead disk and no error it could see.

// installMem swaps g in as the table in force and re-translates every
// started ring in it; all or nothing: on failure the old table stays and
// g is not installed (the caller unmaps what it mapped for g). On success
// the regions of the old table that g does not keep are unmapped, after the
// swap. Preconditions: control goroutine; mu not held.
func (s *session) installMem(g *guestMem) error {
	// Requests hold slices of the old table while they run: wait until
	// every one in flight has completed and been published, and start no
	// other, before swapping (and later unmapping) it.
	s.reqs.drain()
	defer s.reqs.resume()
	s.mu.Lock()
	prev := s.mem
	s.mem = g
	qs := make([]virtqueue.Queue, len(s.rings))
	for i, r := range s.rings {
		if r == nil || r.q == nil {
			continue
		}
		if g.empty() {
			s.mem = prev
			s.mu.Unlock()
			return fmt.Errorf("ring %d is started and the table is empty: %w", r.index, ErrGuestMemory)
		}
		q, err := s.newQueue(r, r.q.Base())
		if err != nil {
			s.mem = prev
			s.mu.Unlock()
			return fmt.Errorf("ring %d: %w", r.index, err)
		}
		qs[i] = q
	}
	for i, q := range qs {
		if q != nil {
			s.rings[i].q = q
		}
	}
	s.mu.Unlock()
	for _, r := range prev.without(g) {
		r.unmap()
	}
	return nil
}

// addMemReg handles ADD_MEM_REG.
func (s *session) addMemReg(m *message) error {
	wr, _ := ParseMemRegion(m.payload)
	var cur []*mappedRegion
	if s.mem != nil {
		cur = s.mem.regions
	}
	if len(cur) >= MaxMemSlots {
		return fmt.Errorf("ADD_MEM_REG: %d regions in use, at most %d: %w", len(cur), MaxMemSlots, ErrGuestMemory)
	}
	mr, err := mapRegion(wr, m.fds[0])
	// The dispatcher closes the fd: the mapping keeps the memory alive.
	if err != nil {
		return fmt.Errorf("ADD_MEM_REG: guest address %#x: %w", wr.GuestPhysAddr, err)
	}
	g, err := newGuestMem(append(slices.Clone(cur), mr))
	if err == nil {
		err = s.installMem(g)
	}
	if err != nil {
		mr.unmap()
		return fmt.Errorf("ADD_MEM_REG: guest address %#x size %#x: %w", wr.GuestPhysAddr, wr.Size, err)
	}
	return nil
}

// remMemReg handles REM_MEM_REG.
func (s *session) remMemReg(m *message) error {
	wr, _ := ParseMemRegion(m.payload)
	var cur []*mappedRegion
	if s.mem != nil {
		cur = s.mem.regions
	}
	i := slices.IndexFunc(cur, func(r *mappedRegion) bool {
		return r.wire.GuestPhysAddr == wr.GuestPhysAddr && r.wire.Size == wr.Size && r.wire.UserAddr == wr.UserAddr
	})
	if i < 0 {
		return fmt.Errorf("REM_MEM_REG: no region at guest address %#x size %#x user address %#x: %w",
			wr.GuestPhysAddr, wr.Size, wr.UserAddr, errRefused)
	}
	g, err := newGuestMem(slices.Delete(slices.Clone(cur), i, i+1))
	if err != nil {
		// A subset of a valid table is valid; kept for safety.
		return fmt.Errorf("REM_MEM_REG: %w", err)
	}
	for _, r := range s.liveRings() {
		if r.w == nil {
			continue
		}
		if g.empty() {
			return fmt.Errorf("REM_MEM_REG: region at %#x holds started ring %d: %w", wr.GuestPhysAddr, r.index, errRefused)
		}
		if err := checkRingPlacement(g.mem, r, s.packed()); err != nil {
			return fmt.Errorf("REM_MEM_REG: region at %#x holds started ring %d (%v): %w", wr.GuestPhysAddr, r.index, err, errRefused)
		}
	}
	if err := s.installMem(g); err != nil {
		return fmt.Errorf("REM_MEM_REG: %w", err)
	}
	return nil
}
