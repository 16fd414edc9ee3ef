// dinoflow-pause: the pod sandbox's PID 1 on the local real node (scripts/node.sh). The usual
// pause image lives on registry.k8s.io, which this machine cannot reach; this does the same
// job: sleep until SIGTERM/SIGINT, reaping any child re-parented to it (busybox `sleep` as PID 1
// would ignore SIGTERM and make every pod deletion wait for its grace period).
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for sig := range sigs {
		if sig != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
