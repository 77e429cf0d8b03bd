package vhdx

// Group commit: allocations that arrive together share one journal entry
// and its fdatasyncs, and concurrent Syncs share one fdatasync.
//
// Allocations (base images; see "Durability order" in doc.go for why each
// step is safe). The first write into a block reserves the block's file
// range under Image.mu and adds {BAT index, new entry} to the open batch;
// it then writes its payload without the lock and waits for its batch. If
// no batch is being committed, a waiting member becomes the leader: it
// takes the open batch (a new, empty one opens at once), builds the BAT
// sectors it changes from the in-memory BAT, releases Image.mu and commits
// them as one journal entry (journal.commitBatch: entry, sync, in-place
// writes left for the next sync; doc.go says when a sync goes first).
// Meanwhile new allocations reserve blocks and join the next batch. The
// leader then retakes Image.mu, publishes the entries, wakes the members
// and hands leadership on: the next waiting member of the open batch leads
// it. A batch holds at most allocBatchMax blocks, and its entry at most
// allocBatchMax BAT sectors, so it fits the smallest (1 MiB) log; an
// allocation finding the open batch full waits for the next one.
//
// A differencing image's first writes use the same batches, with an entry
// that also sets sector bitmap bits and always syncs first (diffgroup.go).
//
// A second write into a block whose allocation is still in an uncommitted
// batch writes into the reserved range and waits for that batch: the block
// has exactly one range, and neither write returns before its entry is
// published.
//
// While a leader commits (allocGroup.leading), Image.mu is free but the
// journal is the leader's: every other journal user takes Image.mu through
// lockJournal, which waits until no leader runs. The in-memory BAT of the
// batch's blocks changes only when the leader publishes, under Image.mu and
// before leading is cleared, so whoever commits next snapshots it.

import (
	"cmp"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

// allocBatchMax bounds the blocks of one batch: 64 BAT sectors at most,
// which with the descriptor sector fit the smallest (1 MiB) log (§2.3).
const allocBatchMax = 64

// allocGroup is the leader/follower state of allocation batches. Every
// field is under Image.mu.
type allocGroup struct {
	cond    *sync.Cond // on Image.mu: a batch was taken or finished
	open    *allocBatch
	leading bool // a leader is committing a batch (Image.mu released)
	pending map[uint64]*pendingAlloc
	// durableEnd: a file size known durable, the FlushedFileOffset of a
	// batch entry written without a sync first (§2.3.1.1); 0: none yet.
	durableEnd uint64

	// Test hooks, nil in production: beforeLead runs (without Image.mu)
	// when a member has become leader, before it takes the open batch;
	// arrived runs (under Image.mu) when a member's payload is written and
	// it starts waiting, with the number of blocks in the open batch.
	beforeLead func()
	arrived    func(open int)

	// A differencing image's batches (diffgroup.go): the batch that
	// reserved a payload block (by BAT index) or a chunk's sector bitmap
	// block (by chunk), until it is done.
	pendPay map[uint64]*allocBatch
	pendSB  map[uint64]*allocBatch
	// The batch that makes a payload block FULLY_PRESENT (by BAT index;
	// diffReservations.full), until it is done.
	pendFull map[uint64]*allocBatch
	// Test hook, nil in production: runs under Image.mu when a
	// differencing batch is built, just before its leader releases the
	// lock to commit it.
	beforeDiffCommit func()
	// Test hook, nil in production: runs under Image.mu when a
	// differencing write finds its block reserved by a batch it cannot
	// join (writeDiff) and starts waiting for that batch.
	reservedWait func(idx uint64)
}

// allocBatch is a set of allocations committed by one journal entry.
type allocBatch struct {
	items  []batChange       // idx and new entry; old is unused
	reused bool              // some block reuses freed space
	diff   *diffReservations // a differencing image's members (diffgroup.go)
	done   bool
	err    error
}

// pendingAlloc is a block reserved in a batch that has not finished.
type pendingAlloc struct {
	b       *allocBatch
	off     uint64
	members int // writers into the block while it is pending
}

// group returns the allocation group, set up on first use. Caller holds
// im.mu.
func (im *Image) group() *allocGroup {
	ag := &im.ag
	if ag.cond == nil {
		ag.cond = sync.NewCond(&im.mu)
		ag.open = &allocBatch{}
		ag.pending = map[uint64]*pendingAlloc{}
		ag.pendPay = map[uint64]*allocBatch{}
		ag.pendSB = map[uint64]*allocBatch{}
		ag.pendFull = map[uint64]*allocBatch{}
	}
	return ag
}

// lockJournal takes im.mu for a caller that may commit through the
// journal, waiting until no allocation batch is being committed.
func (im *Image) lockJournal() {
	im.mu.Lock()
	im.awaitJournalLocked()
}

// awaitJournalLocked waits, with im.mu held (and released while waiting),
// until no allocation batch is being committed. Callers run it before they
// read the state they will commit.
func (im *Image) awaitJournalLocked() {
	ag := im.group()
	for ag.leading {
		ag.cond.Wait()
	}
}

// allocate handles the first write to block idx of a base image: reserve a
// range (reserveBlock: free space past its grace period, zeroed, or fresh
// space at the 1 MiB-aligned end of the file), write p there without the
// lock (the rest of the block reads as zeros), and return once the batch
// holding the block has journaled its BAT sector (§2.3) and published the
// entry. On a failed commit the in-memory BAT is unchanged and the reserved
// range is not handed out again this session, so a half-done attempt cannot
// alias a later block. Stale-data states (UNDEFINED, UNMAPPED) and ZERO get
// a fresh block too.
func (im *Image) allocate(p []byte, idx, in uint64) error {
	im.mu.Lock()
	defer im.mu.Unlock()
	ag := im.group()
	var b *allocBatch
	var off uint64
	for b == nil {
		if im.closed.Load() {
			return fmt.Errorf("write: %w", ErrClosed)
		}
		if e := im.bat.load(idx); batState(e) == stateFullyPresent {
			// Another writer's batch published the block: an ordinary
			// overwrite, which needs no lock.
			im.mu.Unlock()
			err := im.writePayload(p, batFileOffset(e)+in)
			im.mu.Lock()
			return err
		}
		if pa, ok := ag.pending[idx]; ok {
			b, off = pa.b, pa.off
			pa.members++
			break
		}
		if len(ag.open.items) >= allocBatchMax {
			ag.cond.Wait() // until a leader takes the open batch
			continue
		}
		end := im.fileEnd
		var err error
		if off, err = im.reserveBlock(idx); err != nil {
			return err
		}
		if off < end {
			// Reused space, zeroed by reserveBlock: the zeroing must be
			// durable before the entry (doc.go, rule 2).
			ag.open.reused = true
		}
		b = ag.open
		b.items = append(b.items, batChange{idx: idx, new: makeBATEntry(stateFullyPresent, off)})
		ag.pending[idx] = &pendingAlloc{b: b, off: off, members: 1}
	}
	im.mu.Unlock()
	// Not yet published: its batch's commit makes it durable first
	// (writeFreshPayload, recover.go).
	werr := im.writeFreshPayload(p, off+in)
	im.mu.Lock()
	if pa := ag.pending[idx]; werr != nil && pa != nil && pa.b == b && pa.members == 1 && b == ag.open {
		// The only writer into the block failed (a full host disk, say)
		// and no leader has taken the batch: the block leaves it and its
		// range is given back (nospace.go), so a retry neither grows the
		// file nor finds half a failed write published. Once shared or
		// taken, the block is committed and the failed range is undefined,
		// as on any disk.
		b.items = slices.DeleteFunc(b.items, func(c batChange) bool { return c.idx == idx })
		delete(ag.pending, idx)
		im.giveBack(off, im.blockSpan(off).len())
		ag.cond.Broadcast() // room in the open batch
		return werr
	}
	if ag.arrived != nil {
		ag.arrived(len(ag.open.items))
	}
	im.awaitBatch(b)
	if werr != nil {
		return werr
	}
	return b.err
}

// batchCommitted counts a committed batch's n new blocks and records that
// its entry's sync made the file growth up to fileEnd durable. Caller holds
// im.mu, as the batch's leader.
func (im *Image) batchCommitted(n, fileEnd uint64) {
	im.allocated.Add(n)
	im.counters.allocations.Add(n)
	im.counters.allocBatches.Add(1)
	im.ag.durableEnd = fileEnd
}

// awaitBatch returns once batch b is done, leading it when nobody commits
// (b is then still the open batch). Caller holds im.mu; it is released
// while waiting and while leading.
func (im *Image) awaitBatch(b *allocBatch) {
	ag := &im.ag
	for !b.done {
		if !ag.leading {
			im.leadBatch()
			continue
		}
		ag.cond.Wait()
	}
}

// leadBatch commits the open batch as its leader. Caller holds im.mu and
// no leader runs; im.mu is released during the commit's I/O.
func (im *Image) leadBatch() {
	ag := &im.ag
	ag.leading = true
	if ag.beforeLead != nil {
		im.mu.Unlock()
		ag.beforeLead()
		im.mu.Lock()
	}
	b := ag.open
	ag.open = &allocBatch{}
	ag.cond.Broadcast() // allocations waiting for room join the new batch
	if b.diff != nil {
		err := im.commitDiffBatch(b) // diffgroup.go
		for idx := range b.diff.pay {
			delete(ag.pendPay, idx)
		}
		for chunk := range b.diff.sb {
			delete(ag.pendSB, chunk)
		}
		for idx := range b.diff.full {
			delete(ag.pendFull, idx)
		}
		b.done, b.err = true, err
		ag.leading = false
		ag.cond.Broadcast()
		return
	}

	slices.SortFunc(b.items, func(x, y batChange) int { return cmp.Compare(x.idx, y.idx) })
	j := im.journal
	updates, err := im.batchUpdates(b.items, j.deferredSectors())
	fileEnd := im.fileEnd
	if err == nil {
		// The entry's LastFileOffset is fileEnd; the file is that long
		// already unless a growth failed, and growing it here, under the
		// lock, keeps the journal from ever truncating it while others
		// extend it (it extends only a shorter file).
		err = im.growTo(fileEnd)
	}
	// The sync before the entry is needed only for what the entry depends
	// on (doc.go, rule 2): zeroed reused space, or a durable file size to
	// record when none is known. The previous batch's deferred BAT writes
	// are held again by this entry (batchUpdates), or the journal syncs.
	presync := b.reused || ag.durableEnd == 0
	if err == nil && len(updates) > allocBatchMax {
		// Too many to hold again: sync instead, and journal the batch's
		// own sectors only.
		presync = true
		updates, err = im.batchUpdates(b.items, nil)
	}
	flushed := ag.durableEnd
	if presync {
		flushed = fileEnd
	}
	untouched := true // nothing of this batch reached the journal yet
	im.mu.Unlock()
	if err == nil {
		untouched = false
		if _, err = j.commitBatch(updates, flushed, fileEnd, presync); err != nil {
			untouched = errors.Is(err, errLogUntouched)
			err = fmt.Errorf("BAT entries %d..%d (%d blocks): commit through the log: %w",
				b.items[0].idx, b.items[len(b.items)-1].idx, len(b.items), err)
		}
	}
	im.mu.Lock()
	if err == nil {
		for _, it := range b.items {
			im.bat.store(it.idx, it.new)
		}
		im.batchCommitted(uint64(len(b.items)), fileEnd)
	}
	if err != nil && untouched {
		// No entry can name these ranges (a full host disk met before the
		// journal wrote, nospace.go): give them back, so a disk that stays
		// full does not make every retry grow the file.
		spans := make([]ownedSpan, 0, len(b.items))
		for _, it := range b.items {
			spans = append(spans, im.blockSpan(batFileOffset(it.new)))
		}
		slices.SortFunc(spans, func(x, y ownedSpan) int { return cmp.Compare(x.start, y.start) })
		im.giveBackAll(spans)
	}
	for _, it := range b.items {
		delete(ag.pending, it.idx)
	}
	b.done, b.err = true, err
	ag.leading = false
	ag.cond.Broadcast()
}

// batchUpdates builds one journal update per BAT sector that the changes
// (sorted by idx) touch or that lies at one of the file offsets in again
// (the previous batch's deferred writes), from the in-memory BAT with the
// changes applied. Offsets outside the BAT are left out: the journal then
// syncs before the entry. Caller holds im.mu.
func (im *Image) batchUpdates(changes []batChange, again []uint64) ([]logUpdate, error) {
	per := uint64(batSectorSize / 8)
	secs := make([]uint64, 0, len(changes)+len(again))
	for _, c := range changes {
		secs = append(secs, c.idx/per)
	}
	for _, off := range again {
		if off >= im.l.bat.offset && (off-im.l.bat.offset)%batSectorSize == 0 {
			if sec := (off - im.l.bat.offset) / batSectorSize; sec*per < im.l.batOnDisk {
				secs = append(secs, sec)
			}
		}
	}
	slices.Sort(secs)
	secs = slices.Compact(secs)
	updates := make([]logUpdate, 0, len(secs))
	set := make([][2]uint64, 0, len(changes))
	i := 0
	for _, sec := range secs {
		set = set[:0]
		for ; i < len(changes) && changes[i].idx/per == sec; i++ {
			set = append(set, [2]uint64{changes[i].idx, changes[i].new})
		}
		u, err := im.batSectorUpdate(sec*per, set)
		if err != nil {
			return nil, err
		}
		updates = append(updates, u)
	}
	return updates, nil
}

// syncGroup coalesces Syncs: a Sync returns the result of an fdatasync that
// started after the call, so every write completed before the call is
// covered, and one fdatasync answers every caller that arrived while the
// previous one ran. Numbers: started counts fdatasyncs begun, done the ones
// finished; a caller arriving when started = n needs sync n+1 (sync n may
// have begun before its writes completed) and returns once done ≥ n+1.
type syncGroup struct {
	mu      sync.Mutex
	running bool
	started uint64
	done    uint64
	err     error         // result of sync number done
	wake    chan struct{} // closed when the running sync finishes
	syncs   *atomic.Uint64

	waiting func() // test hook: a caller starts waiting for a sync
}

// do runs sync, or waits for a run that starts after the call. The error
// returned is that of the newest finished sync, which is at least the one
// needed; under syncLatch a failure stays a failure for every later sync.
func (g *syncGroup) do(sync func() error) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	need := g.started + 1
	for g.done < need {
		if !g.running {
			g.running = true
			g.started++
			n := g.started
			g.mu.Unlock()
			if g.syncs != nil {
				g.syncs.Add(1)
			}
			err := sync()
			g.mu.Lock()
			g.running, g.done, g.err = false, n, err
			if g.wake != nil {
				close(g.wake)
				g.wake = nil
			}
			break
		}
		if g.wake == nil {
			g.wake = make(chan struct{})
		}
		w := g.wake
		if g.waiting != nil {
			g.waiting()
		}
		g.mu.Unlock()
		<-w
		g.mu.Lock()
	}
	return g.err
}
