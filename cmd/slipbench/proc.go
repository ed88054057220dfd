package main

import (
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// server is the registry under test, started from a shell command so that
// one tool can drive slipway, distribution and the ceiling alike. The
// command gets SLIPBENCH_LISTEN (host:port), SLIPBENCH_UPSTREAM (a URL) and
// SLIPBENCH_DATA (an empty directory) and should exec the server, so that
// its PID is the one /proc is read for.
type server struct {
	URL  string
	cmd  *exec.Cmd
	done chan struct{}
}

func startServer(command, upstreamURL, dataDir string, logTo io.Writer) (*server, error) {
	addr, err := freeAddr()
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dataDir, 0o755); err != nil {
		return nil, err
	}
	cmd := exec.Command("sh", "-c", command)
	cmd.Env = append(os.Environ(),
		"SLIPBENCH_LISTEN="+addr,
		"SLIPBENCH_UPSTREAM="+upstreamURL,
		"SLIPBENCH_DATA="+dataDir,
	)
	cmd.Stdout, cmd.Stderr = logTo, logTo
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &server{URL: "http://" + addr, cmd: cmd, done: make(chan struct{})}
	go func() {
		cmd.Wait()
		close(s.done)
	}()
	if err := s.waitReady(30 * time.Second); err != nil {
		s.Stop()
		return nil, err
	}
	return s, nil
}

// waitReady polls GET /v2/ until any answer below 500 comes back.
func (s *server) waitReady(within time.Duration) error {
	c := &http.Client{Timeout: time.Second}
	deadline := time.Now().Add(within)
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("server exited before it was ready: %v", s.cmd.ProcessState)
		default:
		}
		if resp, err := c.Get(s.URL + "/v2/"); err == nil {
			resp.Body.Close()
			if resp.StatusCode < 500 {
				return nil
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("%s/v2/ not ready within %s", s.URL, within)
}

func (s *server) Pid() int { return s.cmd.Process.Pid }

// Stop sends SIGTERM to the process group, then SIGKILL after 10 s.
func (s *server) Stop() {
	syscall.Kill(-s.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-s.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-s.cmd.Process.Pid, syscall.SIGKILL)
		<-s.done
	}
}

func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// peakRSS is VmHWM of pid in MiB: the most memory it has held resident.
func peakRSS(pid int) (float64, error) {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(s), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			kb, err := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status has no VmHWM", pid)
}

// cpuSeconds is pid's user plus system CPU time, from /proc/PID/stat.
func cpuSeconds(pid int) (float64, error) {
	s, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The fields after the command name, which sits in parentheses and
	// may itself hold spaces: utime and stime are the 14th and 15th.
	f := strings.Fields(string(s)[strings.LastIndexByte(string(s), ')')+2:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ut, err1 := strconv.ParseFloat(f[11], 64)
	st, err2 := strconv.ParseFloat(f[12], 64)
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: utime %q stime %q", pid, f[11], f[12])
	}
	return (ut + st) / 100, nil // USER_HZ is 100 on Linux
}

func discardLogger() *log.Logger { return log.New(io.Discard, "", 0) }
