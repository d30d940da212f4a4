// Command go-peer is a Go peer of r3map-grpc's tests: a server and a client of the Go r3map's
// gRPC services (mount.v1.Backend and migration.v1.Seeder), built with Go's gRPC from the very
// .proto files in crates/grpc/proto, so that the Rust server and client are checked against
// another implementation of the same protocol, not only against each other.
//
// It is built by the test (tests/grpc/go_peer.rs) with Debian's Go packages only, in GOPATH
// mode and without the network; by hand, from crates/grpc:
//
//	mkdir -p /tmp/peer/src
//	protoc -I proto --go_out=/tmp/peer/src --go-grpc_out=/tmp/peer/src \
//	    mount/v1/backend.proto migration/v1/seeder.proto
//	GO111MODULE=off GOPROXY=off GOPATH=/tmp/peer:/usr/share/gocode \
//	    go build -o /tmp/peer/go-peer tests/go-peer/main.go
//
// Usage:
//
//	go-peer server -size N [-chunk C]
//	    Serves both services over N bytes of memory on 127.0.0.1, on a port the kernel picks,
//	    and prints "listening on 127.0.0.1:PORT" once it accepts connections. It behaves like
//	    the Go r3map's services: ReadAt answers P of the full Length, and a read that does not
//	    fit is an error; it uses gRPC's default message limits (4 MiB received). The seeder
//	    tracks writes in chunks of C bytes (default 4096) from Track to Sync. It prints
//	    "call Backend.Sync", "call Seeder.Track", "call Seeder.Sync dirty=K" and
//	    "call Seeder.Close" when those are called.
//
//	go-peer client -addr HOST:PORT -size N [-chunk C] [-seeder]
//	    Writes a pattern over all N bytes with Backend.WriteAt, reads it back with
//	    Backend.ReadAt, checks the end-of-backend rules of r3map's Rust server and calls
//	    Backend.Sync. With -seeder it then does what a migration destination does: Seeder.Track,
//	    pulls every chunk with Seeder.ReadAt while writes reach the source (here through
//	    Backend.WriteAt), Seeder.Sync, pulls the dirty chunks again and Seeder.Close. It prints
//	    "result: ok ..." and exits 0, or "result: FAIL ..." and exits 1 on the first mismatch.
//
// The pattern byte at offset i is byte(i%251) ^ byte(i/251); the writes during the migration
// put byte(0xE0+k) over the k-th of the ranges in seederWrites.
package main

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"sort"
	"sync"
	"time"

	migrationv1 "github.com/pojntfx/r3map/pkg/api/proto/migration/v1"
	mountv1 "github.com/pojntfx/r3map/pkg/api/proto/mount/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxChunkSize is the Go r3map's largest ReadAt.
const maxChunkSize = 32 * 1024 * 1024

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: go-peer server|client [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "server":
		err = server(os.Args[2:])
	case "client":
		err = client(os.Args[2:])
	default:
		err = fmt.Errorf("unknown mode %q: server or client", os.Args[1])
	}
	if err != nil {
		fmt.Printf("result: FAIL %v\n", err)
		os.Exit(1)
	}
}

// pattern is the byte the client writes at offset i.
func pattern(i int64) byte {
	return byte(i%251) ^ byte(i/251)
}

// memory is the server's data, with the seeder's record of the chunks written since Track.
type memory struct {
	mu       sync.Mutex
	data     []byte
	chunk    int64
	tracking bool
	dirty    map[int64]bool
}

func (m *memory) readAt(length int32, off int64) (*mountv1.ReadAtReply, error) {
	// As the Go r3map: P has the full length, and io.ReaderAt's short read (EOF) is an error.
	if length > maxChunkSize {
		return nil, errors.New("max chunk size exceeded")
	}
	if length < 0 || off < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "ReadAt of %d bytes at offset %d", length, off)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	p := make([]byte, length)
	if off >= int64(len(m.data)) {
		return nil, errors.New("EOF")
	}
	n := copy(p, m.data[off:])
	if n < len(p) {
		return nil, errors.New("EOF")
	}
	return &mountv1.ReadAtReply{N: int32(n), P: p}, nil
}

func (m *memory) writeAt(p []byte, off int64) (int32, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if off < 0 || off > int64(len(m.data)) || int64(len(p)) > int64(len(m.data))-off {
		return 0, status.Errorf(codes.OutOfRange, "WriteAt of %d bytes at offset %d past the end (%d bytes)", len(p), off, len(m.data))
	}
	copy(m.data[off:], p)
	if m.tracking && len(p) > 0 {
		for c := off / m.chunk; c <= (off+int64(len(p))-1)/m.chunk; c++ {
			m.dirty[c*m.chunk] = true
		}
	}
	return int32(len(p)), nil
}

type backendServer struct {
	mountv1.UnimplementedBackendServer
	m *memory
}

func (s *backendServer) ReadAt(_ context.Context, args *mountv1.ReadAtArgs) (*mountv1.ReadAtReply, error) {
	return s.m.readAt(args.GetLength(), args.GetOff())
}

func (s *backendServer) WriteAt(_ context.Context, args *mountv1.WriteAtArgs) (*mountv1.WriteAtReply, error) {
	n, err := s.m.writeAt(args.GetP(), args.GetOff())
	if err != nil {
		return nil, err
	}
	return &mountv1.WriteAtReply{Length: n}, nil
}

func (s *backendServer) Sync(context.Context, *mountv1.SyncArgs) (*mountv1.SyncReply, error) {
	fmt.Println("call Backend.Sync")
	return &mountv1.SyncReply{}, nil
}

type seederServer struct {
	migrationv1.UnimplementedSeederServer
	m *memory
}

func (s *seederServer) ReadAt(_ context.Context, args *migrationv1.ReadAtArgs) (*migrationv1.ReadAtReply, error) {
	r, err := s.m.readAt(args.GetLength(), args.GetOff())
	if err != nil {
		return nil, err
	}
	return &migrationv1.ReadAtReply{N: r.N, P: r.P}, nil
}

func (s *seederServer) Track(context.Context, *migrationv1.TrackArgs) (*migrationv1.TrackReply, error) {
	s.m.mu.Lock()
	s.m.tracking = true
	s.m.dirty = map[int64]bool{}
	s.m.mu.Unlock()
	fmt.Println("call Seeder.Track")
	return &migrationv1.TrackReply{}, nil
}

// Sync answers the byte offsets of the chunks written since Track, ascending, and stops tracking.
func (s *seederServer) Sync(context.Context, *migrationv1.SyncArgs) (*migrationv1.SyncReply, error) {
	s.m.mu.Lock()
	offsets := make([]int64, 0, len(s.m.dirty))
	for off := range s.m.dirty {
		offsets = append(offsets, off)
	}
	s.m.tracking = false
	s.m.dirty = map[int64]bool{}
	s.m.mu.Unlock()
	sort.Slice(offsets, func(i, j int) bool { return offsets[i] < offsets[j] })
	fmt.Printf("call Seeder.Sync dirty=%d\n", len(offsets))
	return &migrationv1.SyncReply{DirtyOffsets: offsets}, nil
}

func (s *seederServer) Close(context.Context, *migrationv1.CloseArgs) (*migrationv1.CloseReply, error) {
	fmt.Println("call Seeder.Close")
	return &migrationv1.CloseReply{}, nil
}

func server(args []string) error {
	flags := flag.NewFlagSet("server", flag.ContinueOnError)
	size := flags.Int64("size", 0, "bytes of memory to serve")
	chunk := flags.Int64("chunk", 4096, "the seeder's chunk size in bytes")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *size <= 0 || *chunk <= 0 {
		return errors.New("-size and -chunk must be positive")
	}
	listener, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	m := &memory{data: make([]byte, *size), chunk: *chunk, dirty: map[int64]bool{}}
	s := grpc.NewServer()
	mountv1.RegisterBackendServer(s, &backendServer{m: m})
	migrationv1.RegisterSeederServer(s, &seederServer{m: m})
	// The listener accepts already: connections wait in its backlog until Serve takes them.
	fmt.Printf("listening on %s\n", listener.Addr())
	return s.Serve(listener)
}

// ranges is a list of [offset, length) pieces covering a size.
func pieces(size, step int64) [][2]int64 {
	var out [][2]int64
	for off := int64(0); off < size; off += step {
		n := step
		if size-off < n {
			n = size - off
		}
		out = append(out, [2]int64{off, n})
	}
	return out
}

func client(args []string) error {
	flags := flag.NewFlagSet("client", flag.ContinueOnError)
	addr := flags.String("addr", "", "HOST:PORT of the server")
	size := flags.Int64("size", 0, "the size of the server's backend in bytes")
	chunk := flags.Int64("chunk", 4096, "the seeder's chunk size in bytes")
	seeder := flags.Bool("seeder", false, "also act as a migration destination with the Seeder service")
	if err := flags.Parse(args); err != nil {
		return err
	}
	if *addr == "" || *size <= 0 || *chunk <= 0 {
		return errors.New("-addr, -size and -chunk are required")
	}
	// A guard against a server that never answers: the test waits for this process to end.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	conn, err := grpc.DialContext(ctx, *addr, grpc.WithInsecure(), grpc.WithBlock())
	if err != nil {
		return fmt.Errorf("dial %s: %w", *addr, err)
	}
	defer conn.Close()

	model := make([]byte, *size)
	for i := range model {
		model[i] = pattern(int64(i))
	}
	if err := backendChecks(ctx, mountv1.NewBackendClient(conn), model); err != nil {
		return err
	}
	if !*seeder {
		fmt.Printf("result: ok backend: wrote, read back and synced %d bytes\n", *size)
		return nil
	}
	dirty, err := migrate(ctx, mountv1.NewBackendClient(conn), migrationv1.NewSeederClient(conn), model, *chunk)
	if err != nil {
		return err
	}
	fmt.Printf("result: ok backend and seeder: %d bytes, %d dirty chunks pulled again\n", *size, dirty)
	return nil
}

func backendChecks(ctx context.Context, b mountv1.BackendClient, model []byte) error {
	size := int64(len(model))
	// Writes of 1 MiB and reads of a size that crosses their boundaries.
	for _, p := range pieces(size, 1<<20) {
		reply, err := b.WriteAt(ctx, &mountv1.WriteAtArgs{Off: p[0], P: model[p[0] : p[0]+p[1]]})
		if err != nil {
			return fmt.Errorf("WriteAt of %d bytes at %d: %w", p[1], p[0], err)
		}
		if int64(reply.GetLength()) != p[1] {
			return fmt.Errorf("WriteAt of %d bytes at %d answered Length %d", p[1], p[0], reply.GetLength())
		}
	}
	for _, p := range pieces(size, 777*1024+3) {
		if err := readAndCheck(ctx, b, model, p[0], p[1]); err != nil {
			return err
		}
	}
	// r3map's Rust server answers a read that starts inside and crosses the end with the bytes
	// that exist, one that starts at the end with OUT_OF_RANGE, and refuses writes past the end.
	tail := int64(10)
	if size < tail {
		tail = size
	}
	reply, err := b.ReadAt(ctx, &mountv1.ReadAtArgs{Length: int32(tail + 100), Off: size - tail})
	if err != nil {
		return fmt.Errorf("ReadAt across the end: %w", err)
	}
	if int64(reply.GetN()) != tail || !bytes.Equal(reply.GetP(), model[size-tail:]) {
		return fmt.Errorf("ReadAt across the end answered N = %d and %d bytes, not the last %d", reply.GetN(), len(reply.GetP()), tail)
	}
	if _, err := b.ReadAt(ctx, &mountv1.ReadAtArgs{Length: 1, Off: size}); status.Code(err) != codes.OutOfRange {
		return fmt.Errorf("ReadAt at the end answered %v, not OUT_OF_RANGE", err)
	}
	if _, err := b.WriteAt(ctx, &mountv1.WriteAtArgs{Off: size - 1, P: []byte{1, 2}}); status.Code(err) != codes.OutOfRange {
		return fmt.Errorf("WriteAt across the end answered %v, not OUT_OF_RANGE", err)
	}
	if err := readAndCheck(ctx, b, model, size-1, 1); err != nil {
		return fmt.Errorf("after the refused write: %w", err)
	}
	if _, err := b.Sync(ctx, &mountv1.SyncArgs{}); err != nil {
		return fmt.Errorf("Sync: %w", err)
	}
	return nil
}

func readAndCheck(ctx context.Context, b mountv1.BackendClient, model []byte, off, length int64) error {
	reply, err := b.ReadAt(ctx, &mountv1.ReadAtArgs{Length: int32(length), Off: off})
	if err != nil {
		return fmt.Errorf("ReadAt of %d bytes at %d: %w", length, off, err)
	}
	return check(reply.GetN(), reply.GetP(), model, off, length)
}

func check(n int32, p, model []byte, off, length int64) error {
	if int64(n) != length || int64(len(p)) != length {
		return fmt.Errorf("ReadAt of %d bytes at %d answered N = %d and %d bytes", length, off, n, len(p))
	}
	want := model[off : off+length]
	if i := firstDifference(p, want); i >= 0 {
		return fmt.Errorf("byte %d reads %d, but %d was written", off+int64(i), p[i], want[i])
	}
	return nil
}

func firstDifference(a, b []byte) int {
	for i := range a {
		if a[i] != b[i] {
			return i
		}
	}
	return -1
}

// seederWrites are the writes that reach the source during the migration, as fractions of a
// chunk and of the size: inside chunk 1, across the boundary of chunks 2 and 3, and the last
// byte.
func seederWrites(size, chunk int64) [][2]int64 {
	return [][2]int64{{chunk + 7, 10}, {3*chunk - 1, 2}, {size - 1, 1}}
}

// migrate does what a migration destination does with the source's Seeder: Track, pull every
// chunk, Sync for the chunks written meanwhile, pull those again, Close. It returns how many
// chunks were dirty.
func migrate(ctx context.Context, b mountv1.BackendClient, s migrationv1.SeederClient, model []byte, chunk int64) (int, error) {
	size := int64(len(model))
	if size < 3*chunk+1 {
		return 0, fmt.Errorf("the seeder checks need more than 3 chunks of %d bytes", chunk)
	}
	if _, err := s.Track(ctx, &migrationv1.TrackArgs{}); err != nil {
		return 0, fmt.Errorf("Seeder.Track: %w", err)
	}
	local := make([]byte, size)
	pull := func(off, length int64) error {
		reply, err := s.ReadAt(ctx, &migrationv1.ReadAtArgs{Length: int32(length), Off: off})
		if err != nil {
			return fmt.Errorf("Seeder.ReadAt of %d bytes at %d: %w", length, off, err)
		}
		if err := check(reply.GetN(), reply.GetP(), model, off, length); err != nil {
			return fmt.Errorf("through the Seeder: %w", err)
		}
		copy(local[off:], reply.GetP())
		return nil
	}
	// The application at the source goes on writing while the destination pulls.
	wantDirty := map[int64]bool{}
	for k, w := range seederWrites(size, chunk) {
		p := bytes.Repeat([]byte{byte(0xE0 + k)}, int(w[1]))
		if _, err := b.WriteAt(ctx, &mountv1.WriteAtArgs{Off: w[0], P: p}); err != nil {
			return 0, fmt.Errorf("WriteAt during the migration: %w", err)
		}
		copy(model[w[0]:], p)
		for c := w[0] / chunk; c <= (w[0]+w[1]-1)/chunk; c++ {
			wantDirty[c*chunk] = true
		}
		if k == 0 {
			for _, p := range pieces(size, chunk) {
				if err := pull(p[0], p[1]); err != nil {
					return 0, err
				}
			}
		}
	}
	reply, err := s.Sync(ctx, &migrationv1.SyncArgs{})
	if err != nil {
		return 0, fmt.Errorf("Seeder.Sync: %w", err)
	}
	offsets := reply.GetDirtyOffsets()
	want := make([]int64, 0, len(wantDirty))
	for off := range wantDirty {
		want = append(want, off)
	}
	sort.Slice(want, func(i, j int) bool { return want[i] < want[j] })
	if fmt.Sprint(offsets) != fmt.Sprint(want) {
		return 0, fmt.Errorf("Seeder.Sync answered dirty offsets %v, not %v", offsets, want)
	}
	for _, off := range offsets {
		length := chunk
		if size-off < length {
			length = size - off
		}
		if err := pull(off, length); err != nil {
			return 0, err
		}
	}
	if i := firstDifference(local, model); i >= 0 {
		return 0, fmt.Errorf("after the migration byte %d is %d at the destination but %d at the source", i, local[i], model[i])
	}
	if _, err := s.Close(ctx, &migrationv1.CloseArgs{}); err != nil {
		return 0, fmt.Errorf("Seeder.Close: %w", err)
	}
	return len(offsets), nil
}
