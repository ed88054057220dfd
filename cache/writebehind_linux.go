package cache

import "golang.org/x/sys/unix"

// startWriteback asks the kernel to start writing a range of the file,
// without waiting for it (sync_file_range(2) with SYNC_FILE_RANGE_WRITE).
// It is only a hint: the fsync that follows is what makes data durable.
func startWriteback(fd uintptr, off, n int64) {
	unix.SyncFileRange(int(fd), off, n, unix.SYNC_FILE_RANGE_WRITE)
}
