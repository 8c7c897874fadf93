// Command workload is the real node's test workload: an echo server and a paced client.
//
//	workload serve [-listen :7000] [-pause-every N -pause-ms M]
//	    echoes every TCP stream and every UDP datagram on the port, until SIGTERM; with -pause-every,
//	    stops reading UDP for M ms after every N datagrams (a slow reader, for the demo).
//	workload client -to HOST:PORT [-proto tcp|udp] [-n 100] [-rate 50] [-size 64] [-timeout 1s]
//	    sends n requests of size bytes at rate per second (one TCP connection, or one UDP socket),
//	    waits for each echo, prints one JSON line
//	    {"proto","sent","received","errors","p50_us","p99_us"} and exits 1 if anything was lost.
package main

import (
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sort"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: workload serve|client [flags]")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		serve(os.Args[2:])
	case "client":
		os.Exit(client(os.Args[2:]))
	default:
		fmt.Fprintf(os.Stderr, "workload: unknown command %q (serve or client)\n", os.Args[1])
		os.Exit(2)
	}
}

func serve(args []string) {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	listen := fs.String("listen", ":7000", "address for both the TCP and the UDP echo")
	pauseEvery := fs.Int("pause-every", 0, "UDP: stop reading after every N datagrams (a slow reader; 0: never)")
	pauseMs := fs.Int("pause-ms", 0, "UDP: for this many milliseconds")
	fs.Parse(args)
	ln, err := net.Listen("tcp", *listen)
	check(err)
	pc, err := net.ListenPacket("udp", *listen)
	check(err)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	go func() {
		buf := make([]byte, 65536)
		for read := 1; ; read++ {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
			if *pauseEvery > 0 && read%*pauseEvery == 0 {
				time.Sleep(time.Duration(*pauseMs) * time.Millisecond)
			}
		}
	}()
	fmt.Printf("echo on tcp and udp %s\n", *listen)
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	<-sig
}

type summary struct {
	Proto    string `json:"proto"`
	Sent     int    `json:"sent"`
	Received int    `json:"received"`
	Errors   int    `json:"errors"`
	P50us    int64  `json:"p50_us"`
	P99us    int64  `json:"p99_us"`
	Error    string `json:"error,omitempty"`
}

func client(args []string) int {
	fs := flag.NewFlagSet("client", flag.ExitOnError)
	to := fs.String("to", "", "HOST:PORT of the echo server")
	proto := fs.String("proto", "tcp", "tcp or udp")
	n := fs.Int("n", 100, "requests to send")
	rate := fs.Float64("rate", 50, "requests per second (0: back to back)")
	size := fs.Int("size", 64, "request size in bytes (at least 8)")
	timeout := fs.Duration("timeout", time.Second, "wait for each echo this long")
	fs.Parse(args)
	if *to == "" || (*proto != "tcp" && *proto != "udp") || *size < 8 || *n < 1 {
		fmt.Fprintln(os.Stderr, "workload client: need -to HOST:PORT, -proto tcp|udp, -size >= 8, -n >= 1")
		return 2
	}
	s := summary{Proto: *proto}
	conn, err := net.DialTimeout(*proto, *to, *timeout)
	if err != nil {
		s.Errors, s.Error = 1, err.Error()
		return report(s)
	}
	defer conn.Close()
	var interval time.Duration
	if *rate > 0 {
		interval = time.Duration(float64(time.Second) / *rate)
	}
	req, resp := make([]byte, *size), make([]byte, *size)
	var rtts []time.Duration
	start := time.Now()
	for seq := 0; seq < *n; seq++ {
		time.Sleep(time.Until(start.Add(time.Duration(seq) * interval)))
		binary.BigEndian.PutUint64(req, uint64(seq))
		t0 := time.Now()
		conn.SetDeadline(t0.Add(*timeout))
		s.Sent++
		if _, err := conn.Write(req); err != nil {
			s.Errors, s.Error = s.Errors+1, err.Error()
			continue
		}
		if err := readEcho(conn, *proto, resp, uint64(seq)); err != nil {
			s.Errors, s.Error = s.Errors+1, err.Error()
			if *proto == "tcp" {
				break // the stream is out of step now
			}
			continue
		}
		rtts = append(rtts, time.Since(t0))
		s.Received++
	}
	sort.Slice(rtts, func(i, j int) bool { return rtts[i] < rtts[j] })
	s.P50us, s.P99us = quantile(rtts, 0.50), quantile(rtts, 0.99)
	return report(s)
}

// readEcho reads the echo of request seq; over UDP a late echo of an earlier request is skipped.
func readEcho(conn net.Conn, proto string, buf []byte, seq uint64) error {
	for {
		if proto == "tcp" {
			if _, err := io.ReadFull(conn, buf); err != nil {
				return err
			}
		} else if k, err := conn.Read(buf); err != nil {
			return err
		} else if k != len(buf) {
			return fmt.Errorf("echo of %d bytes, sent %d", k, len(buf))
		}
		got := binary.BigEndian.Uint64(buf)
		if got == seq {
			return nil
		}
		if proto == "tcp" || got > seq {
			return errors.New("echo out of order")
		}
	}
}

func quantile(sorted []time.Duration, q float64) int64 {
	if len(sorted) == 0 {
		return 0
	}
	return sorted[int(q*float64(len(sorted)-1)+0.5)].Microseconds()
}

func report(s summary) int {
	line, _ := json.Marshal(s)
	fmt.Println(string(line))
	if s.Received != s.Sent || s.Errors > 0 {
		return 1
	}
	return 0
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "workload:", err)
		os.Exit(1)
	}
}
