// Package dashboard owns keysvc's security dashboard, served at /ui/ on the
// admin listener: the login (admin token; or an admin client certificate),
// its server-side sessions, the CSRF checks of its actions, its security
// headers, and the server-rendered pages (html/template, so every value is
// escaped by construction) with their SVG charts. Templates, style sheet and
// script are embedded in the binary; nothing loads from another origin, and
// the pages read fully without JavaScript (static/app.js only adds live
// updates from the event stream).
//
// It owns no data: a Backend (keysvc's Server) reads the fleet, VMs,
// volumes and the audit chain's state, and carries out the actions, each
// audited with the session as the actor. It does not serve the event stream
// itself (GET /v1/admin/events/stream is keysvc's, and takes a dashboard
// session through Authenticated).
package dashboard
