package nbd

import "net"

// ServeKernelStyle serves c as Attach serves the kernel: no handshake,
// threads set up by threadInit.
func (s *Server) ServeKernelStyle(c net.Conn, threadInit func() error) error {
	return s.serve(c, false, threadInit)
}

var IOFlusher = ioFlusher

// KernelSocket wraps fd, one end of a socket pair, as Attach wraps the end
// it serves the kernel on.
func KernelSocket(fd int) (net.Conn, error) { return newBlockingConn(fd) }
