package luks2

// SetAfterFirstCopy installs the crash hook used by the interrupted-update
// tests and returns a func that removes it.
func SetAfterFirstCopy(f func() error) (restore func()) {
	afterFirstCopy = f
	return func() { afterFirstCopy = nil }
}
