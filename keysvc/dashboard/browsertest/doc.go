// Package browsertest holds the dashboard's end-to-end test in a real
// browser (headless Debian chromium, driven with chromedp): a monitored
// keygate boot is attacked, and the alert must reach the VM page live. It
// has no code outside its tests.
package browsertest
