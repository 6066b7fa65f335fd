// Goroutines on GOMAXPROCS threads: eight workers per phase, results gathered through a
// channel and printed in order; a timer between phases (the runtime's network poller:
// an epoll instance and a pipe).
package main

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"time"
)

func work(seed uint64) uint64 {
	x := seed*2654435761 + 1
	var s uint64
	for i := 0; i < 6000000; i++ {
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		s += x & 0xff
	}
	return s
}

func main() {
	fmt.Println("procs", runtime.GOMAXPROCS(0))
	var total uint64
	for phase := 0; phase < 8; phase++ {
		res := make([]uint64, 8)
		var wg sync.WaitGroup
		for w := 0; w < 8; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				res[w] = work(uint64(phase*8 + w))
			}(w)
		}
		wg.Wait()
		var s uint64
		for _, r := range res {
			s += r
		}
		total += s
		<-time.After(5 * time.Millisecond)
		fmt.Println("phase", phase, s)
	}
	fmt.Println("total", total)
	os.Exit(4)
}
