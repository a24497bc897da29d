package nbd

import "net"

// ServeKernelStyle serves c as Attach serves the kernel: no handshake,
// threads set up by threadInit.
func (s *Server) ServeKernelStyle(c net.Conn, threadInit func() error) error {
	return s.serve(c, false, threadInit)
}

var IOFlusher = ioFlusher
