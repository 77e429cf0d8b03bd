package vhostuser

// SetWaitHook makes f run whenever a drain (SET_MEM_TABLE, ADD/REM_MEM_REG,
// Monitor.Quiesce) or a ring stop (GET_VRING_BASE, reset, close) has to
// wait for requests in flight; the returned func removes it. Set it before
// the server starts and remove it after it ended.
func SetWaitHook(f func(what string)) (restore func()) {
	old := waitHook
	waitHook = f
	return func() { waitHook = old }
}

// MaxExecutors is the executor goroutines a queue may start.
const MaxExecutors = maxExecutors

// QuickRun is how many quick requests the owner publishes at a time.
const QuickRun = quickRun
