// Package alert owns the delivery of keysvc's alerts to the tools a
// security team works in: webhooks (JSON, signed with HMAC-SHA256, with an
// idempotency key) and syslog (RFC 5424 over TCP or TLS, octet-counted).
//
// Delivery is at least once. The key service queues each alert for every
// sink in the store's outbox (store.Outbox) before it answers the VM that
// reported it; a Dispatcher then claims due items, delivers them, and
// retries failures with exponential backoff, across restarts, until the
// item is older than the dead-letter age, when it is kept as a dead
// letter (counted in keysvc_alert_dead_letters) and no longer tried. A
// receiver may see an alert twice (a crash between its answer and the
// outbox's update, or two replicas): the idempotency key tells.
//
// It does not decide what is an alert (keysvc does, by severity) nor what
// an alert says (keysvc makes the JSON body).
package alert
