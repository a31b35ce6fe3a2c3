// Command peer is the Go end of netchan-mux's interop test (mux/tests/go_interop.rs):
// hashicorp/yamux with its default configuration (keepalive on), speaking netchan's
// channel-open handshake by hand (docs/protocol.md, Part 1).
//
// Usage: peer <address>. It connects as the yamux client and then:
//  1. accepts the channel "go-echo" and echoes it until netchan half-closes, then half-closes;
//  2. dials netchan's "rust-echo", writes 3 MiB in one Write and checks the echo;
//  3. pings (netchan must answer yamux Ping frames);
//  4. sends GoAway and closes the session.
//
// It prints one line per step and exits non-zero on the first failure.
// Build in GOPATH mode with Debian's packages: GOPATH=/usr/share/gocode GO111MODULE=off.
package main

import (
	"bytes"
	"fmt"
	"hash/fnv"
	"io"
	"net"
	"os"

	"github.com/hashicorp/yamux"
)

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "go peer: "+format+"\n", args...)
	os.Exit(1)
}

// dial opens a stream and runs the dialer's side of the handshake: 01 len name -> 01 00.
func dial(s *yamux.Session, name string) (*yamux.Stream, error) {
	st, err := s.OpenStream()
	if err != nil {
		return nil, err
	}
	req := append([]byte{1, byte(len(name))}, name...)
	if _, err := st.Write(req); err != nil {
		return nil, err
	}
	reply := make([]byte, 2)
	if _, err := io.ReadFull(st, reply); err != nil {
		return nil, err
	}
	if reply[0] != 1 || reply[1] != 0 {
		return nil, fmt.Errorf("channel %q refused with status %d", name, reply[1])
	}
	return st, nil
}

// accept takes the next inbound stream and answers its handshake with 01 00.
func accept(s *yamux.Session) (*yamux.Stream, string, error) {
	st, err := s.AcceptStream()
	if err != nil {
		return nil, "", err
	}
	head := make([]byte, 2)
	if _, err := io.ReadFull(st, head); err != nil {
		return nil, "", err
	}
	if head[0] != 1 {
		return nil, "", fmt.Errorf("handshake version %d", head[0])
	}
	name := make([]byte, head[1])
	if _, err := io.ReadFull(st, name); err != nil {
		return nil, "", err
	}
	if _, err := st.Write([]byte{1, 0}); err != nil {
		return nil, "", err
	}
	return st, string(name), nil
}

func sum(b []byte) uint64 {
	h := fnv.New64a()
	h.Write(b)
	return h.Sum64()
}

func main() {
	if len(os.Args) != 2 {
		fail("usage: peer <address>")
	}
	conn, err := net.Dial("tcp", os.Args[1])
	if err != nil {
		fail("connect: %v", err)
	}
	session, err := yamux.Client(conn, yamux.DefaultConfig())
	if err != nil {
		fail("session: %v", err)
	}

	echoed := make(chan error, 1)
	go func() {
		st, name, err := accept(session)
		if err != nil {
			echoed <- err
			return
		}
		if name != "go-echo" {
			echoed <- fmt.Errorf("accepted %q, expected go-echo", name)
			return
		}
		n, err := io.Copy(st, st)
		if err == nil {
			err = st.Close()
		}
		fmt.Printf("go-echo echoed %d\n", n)
		echoed <- err
	}()

	st, err := dial(session, "rust-echo")
	if err != nil {
		fail("dial rust-echo: %v", err)
	}
	data := make([]byte, 3<<20)
	for i := range data {
		data[i] = byte(i*7 + i>>12)
	}
	// Read the echo back while writing. The echo is read to its length, not to EOF: the
	// hashicorp/yamux in Debian (2019) makes Read return EOF after our own Close whenever its
	// buffer is momentarily empty, so this side must not half-close before it has read all.
	got := make(chan []byte, 1)
	go func() {
		b := make([]byte, len(data))
		if _, err := io.ReadFull(st, b); err != nil {
			fail("read rust-echo: %v", err)
		}
		got <- b
	}()
	if n, err := st.Write(data); err != nil || n != len(data) {
		fail("one write of %d bytes: wrote %d, %v", len(data), n, err)
	}
	back := <-got
	if err := st.Close(); err != nil {
		fail("close rust-echo: %v", err)
	}
	if !bytes.Equal(back, data) {
		fail("rust-echo: %d bytes back (fnv %x), sent %d (fnv %x)", len(back), sum(back), len(data), sum(data))
	}
	fmt.Printf("rust-echo ok %d %x\n", len(back), sum(back))

	if _, err := session.Ping(); err != nil {
		fail("ping: %v", err)
	}
	fmt.Println("ping ok")

	if err := <-echoed; err != nil {
		fail("go-echo: %v", err)
	}
	fmt.Println("go-echo ok")

	if err := session.GoAway(); err != nil {
		fail("go away: %v", err)
	}
	if err := session.Close(); err != nil {
		fail("close: %v", err)
	}
	fmt.Println("closed")
}
