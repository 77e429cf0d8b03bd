package vhostuser_test

import (
	"context"
	"errors"
	"io"
	"testing"

	"github.com/vhost-vhdx/vhost-vhdx/blk"
	"github.com/vhost-vhdx/vhost-vhdx/vhostuser"
)

// FuzzServeConn feeds an arbitrary byte stream (any sequence of messages,
// valid or not, without fds) to a whole session: the server must neither
// panic nor hang, must end the connection when the stream ends, and must
// release what the session allocated (GET_INFLIGHT_FD memfds included:
// their fds arrive here and are closed).
func FuzzServeConn(f *testing.F) {
	const v = vhostuser.FlagVersion
	m := func(req vhostuser.Request, flags uint32, p []byte) []byte {
		return append(vhostuser.AppendHeader(nil, vhostuser.Header{Request: req, Flags: flags, Size: uint32(len(p))}), p...)
	}
	var seed []byte
	seed = append(seed, m(vhostuser.ReqGetFeatures, v, nil)...)
	seed = append(seed, m(vhostuser.ReqGetProtocolFeatures, v, nil)...)
	seed = append(seed, m(vhostuser.ReqSetProtocolFeatures, v, u64(vhostuser.ProtocolFeatures))...)
	seed = append(seed, m(vhostuser.ReqSetOwner, v|vhostuser.FlagNeedReply, nil)...)
	seed = append(seed, m(vhostuser.ReqGetQueueNum, v, nil)...)
	seed = append(seed, m(vhostuser.ReqGetConfig, v, vhostuser.AppendConfig(nil, vhostuser.ConfigMsg{Data: make([]byte, 60)}))...)
	seed = append(seed, m(vhostuser.ReqSetFeatures, v, u64(vhostuser.FeatureVersion1|vhostuser.FeatureProtocolFeatures|1<<blk.FeatureConfigWCE|1<<blk.FeatureFlush))...)
	seed = append(seed, m(vhostuser.ReqSetConfig, v|vhostuser.FlagNeedReply, vhostuser.AppendConfig(nil, vhostuser.ConfigMsg{Offset: blk.ConfigWriteback, Data: []byte{0}}))...)
	seed = append(seed, m(vhostuser.ReqSetConfig, v|vhostuser.FlagNeedReply, vhostuser.AppendConfig(nil, vhostuser.ConfigMsg{Offset: blk.ConfigWriteback, Data: []byte{2}}))...)
	seed = append(seed, m(vhostuser.ReqGetInflightFD, v, vhostuser.AppendInflight(nil, vhostuser.InflightMsg{NumQueues: 1, QueueSize: 128}))...)
	seed = append(seed, m(vhostuser.ReqSetVringNum, v, vs(0, 128))...)
	seed = append(seed, m(vhostuser.ReqSetVringBase, v, vs(0, 7))...)
	seed = append(seed, m(vhostuser.ReqGetVringBase, v, vs(0, 0))...)
	seed = append(seed, m(vhostuser.ReqSetVringEnable, v, vs(0, 1))...)
	seed = append(seed, m(vhostuser.ReqSetStatus, v, u64(15))...)
	seed = append(seed, m(vhostuser.ReqGetStatus, v, nil)...)
	seed = append(seed, m(vhostuser.ReqResetDevice, v, nil)...)
	// SET_BACKEND_REQ_FD arrives here without its fd (and with one payload
	// byte in the second seed): both end the session, so it comes last.
	seed = append(seed, m(vhostuser.ReqSetBackendReqFD, v|vhostuser.FlagNeedReply, nil)...)
	f.Add(seed)
	f.Add(m(vhostuser.ReqGetInflightFD, v, vhostuser.AppendInflight(nil, vhostuser.InflightMsg{NumQueues: 1, QueueSize: 32768})))
	f.Add(m(vhostuser.ReqSetBackendReqFD, v, []byte{0}))
	// Memory slots and dirty logging: GET_MAX_MEM_SLOTS, a removal of a
	// region never added (refused, session kept), LOG_ALL toggled, a
	// logged ring address; then ADD_MEM_REG and SET_LOG_BASE without their
	// fd (both end the session).
	var slots []byte
	slots = append(slots, m(vhostuser.ReqSetProtocolFeatures, v, u64(vhostuser.ProtocolFeatures))...)
	slots = append(slots, m(vhostuser.ReqGetMaxMemSlots, v, nil)...)
	slots = append(slots, m(vhostuser.ReqRemMemReg, v|vhostuser.FlagNeedReply, vhostuser.AppendMemRegion(nil, vhostuser.MemRegion{GuestPhysAddr: 1 << 32, Size: 1 << 20}))...)
	slots = append(slots, m(vhostuser.ReqSetFeatures, v, u64(vhostuser.FeatureVersion1|vhostuser.FeatureProtocolFeatures|vhostuser.FeatureLogAll))...)
	slots = append(slots, m(vhostuser.ReqSetVringNum, v, vs(0, 128))...)
	slots = append(slots, m(vhostuser.ReqSetVringAddr, v, vhostuser.AppendVringAddr(nil, vhostuser.VringAddr{Flags: 1, Desc: 0x1000, Avail: 0x2000, Used: 0x3000, Log: 0x3000}))...)
	slots = append(slots, m(vhostuser.ReqSetFeatures, v, u64(vhostuser.FeatureVersion1|vhostuser.FeatureProtocolFeatures))...)
	f.Add(append(slots, m(vhostuser.ReqAddMemReg, v, vhostuser.AppendMemRegion(nil, vhostuser.MemRegion{Size: 1 << 20}))...))
	f.Add(append(slots, m(vhostuser.ReqSetLogBase, v, vhostuser.AppendLog(nil, vhostuser.LogMsg{MmapSize: 8}))...))
	f.Fuzz(func(t *testing.T, stream []byte) {
		if len(stream) > 1<<16 {
			return
		}
		a, b := socketpair(t)
		defer b.Close()
		drained := make(chan struct{})
		go func() {
			defer close(drained)
			drainReplies(b)
		}()
		done := make(chan error, 1)
		go func() {
			done <- vhostuser.ServeConn(context.Background(), a, vhostuser.Options{Disk: newMemDisk(1 << 20)})
		}()
		if _, err := b.Write(stream); err != nil && !errors.Is(err, io.ErrClosedPipe) {
			// The server may have hung up on a bad message already.
			t.Logf("write: %v", err)
		}
		b.CloseWrite()
		<-done // ServeConn closes a, which ends the drain
		<-drained
	})
}
